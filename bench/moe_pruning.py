"""Expert pruning on a real-weight MoE: SmolLM2-135M MoEfied, every expert metric side by side.

No pretrained mixture-of-experts installs offline, so this builds one from SmolLM2-135M (MoEfication, Zhang
et al., arXiv 2110.01786): each layer's FFN of 1536 neurons is split into ``--experts`` equal experts by
balanced k-means over the neurons' activation patterns on calibration tokens, and a linear router is fitted
by ridge regression to predict the size of each expert's contribution to the FFN output; top-k routing then
sums the selected experts (the Mixtral router renormalises its top-k weights, so the router's logits are
scaled down to near-equal weights and every expert's down projection is multiplied by ``top_k``). The
result is a stock ``MixtralForCausalLM`` (attention, norms, embeddings copied), cached under
``~/.cache/prunekit`` and reused. Its dense-equivalence is checked on build (top-k = all experts with a
zero router reproduces the dense logits).

Protocol (one run, same windows for every row): calibrate on c4 (32 x 256 tokens), evaluate perplexity on
wiki (``--eval-windows`` x 1024 tokens), fp32, no healing. Rows: the dense model, the MoE, then for every
ratio (a fraction of the experts of every MoE layer, the same count in every layer; where fewer than
top-k experts are left, top-k is clamped to the number left) each expert metric (one shared calibration
pass) and a random order, then whole blocks removing at least as many parameters as the 25% expert plan
(prunekit's best block planner and ShortGPT BI), and optionally (``--width taylor``) width pruning at that
budget (channels inside the experts and KV groups, the width planner's cost curves).

The defaults (16 experts of 96 neurons, top-12) keep 75% of each FFN active: SmolLM2's SiLU FFN is not
sparse, and at 50% active the MoE's perplexity is roughly 8x higher than at 75% (without any retraining).

    python bench/moe_pruning.py                    # about 10-15 minutes on 2 cores (+2 min to build the MoE)
    python bench/moe_pruning.py --eval-windows 4   # quicker, noisier

Writes the Markdown table to stdout and to ``--out`` (default bench/results/moe_pruning.md).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402

EXPERT_METRICS = ("expert_random", "expert_frequency", "expert_mass", "moe_pruner", "expert_reconstruction")


# --- MoEfication ---------------------------------------------------------------------------------------


@torch.inference_mode()
def ffn_inputs(model: torch.nn.Module, windows: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """The input of every layer's MLP (after its pre-norm) on the first ``tokens`` calibration tokens."""
    layers = model.model.layers
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        per = windows.shape[1]
        model(input_ids=windows[: max(1, math.ceil(tokens / per))], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g)[:tokens].float() for g in got]


def balanced_kmeans(features: torch.Tensor, k: int, iters: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Split the rows of ``features`` into ``k`` clusters of equal size (cosine k-means, greedy balanced
    assignment: pairs of (row, centroid) in order of similarity, each centroid taking ``n / k`` rows)."""
    n = features.shape[0]
    size = n // k
    x = torch.nn.functional.normalize(features, dim=1)
    gen = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ cent.T  # [n, k]
        order = torch.argsort(sim.reshape(-1), descending=True)
        assign.fill_(-1)
        fill = [0] * k
        left = n
        for flat in order.tolist():
            row, c = divmod(flat, k)
            if assign[row] >= 0 or fill[c] >= size:
                continue
            assign[row] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
        cent = torch.nn.functional.normalize(torch.stack([x[assign == c].mean(0) for c in range(k)]), dim=1)
    return [torch.nonzero(assign == c).squeeze(1) for c in range(k)]


@torch.no_grad()
def moefy(
    dense: torch.nn.Module, windows: torch.Tensor, experts: int, top_k: int, tokens: int, temperature: float
) -> MixtralForCausalLM:
    cfg = dense.config
    inter = cfg.intermediate_size // experts
    mcfg = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    moe = MixtralForCausalLM(mcfg).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    xs = ffn_inputs(dense, windows, tokens)
    for i, (dl, ml) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
        mlp = dl.mlp
        x = xs[i]
        act = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [t, 1536]
        groups = balanced_kmeans(act.abs().T, experts, seed=i)
        gate_up = torch.stack(
            [torch.cat([mlp.gate_proj.weight[g], mlp.up_proj.weight[g]]) for g in groups]
        )  # [E, 2I, H]
        down = torch.stack([mlp.down_proj.weight[:, g] for g in groups])  # [E, H, I]
        # target: the size of each expert's contribution to the FFN output, per token
        target = torch.stack([(act[:, g] @ mlp.down_proj.weight[:, g].T).norm(dim=1) for g in groups], 1)
        xd = x.double()
        gram = xd.T @ xd
        ridge = 1e-3 * gram.diagonal().mean()
        w = torch.linalg.solve(
            gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target.double()
        )
        logits = x @ w.float()
        # near-equal renormalised weights (1/top_k each) whatever the top-k: the selected experts add up
        w = w.float() / (logits.std() / temperature)
        ml.mlp.experts.gate_up_proj.copy_(gate_up)
        ml.mlp.experts.down_proj.copy_(down * top_k)
        ml.mlp.gate.weight.copy_(w.T)
    return moe


@torch.no_grad()
def check_dense_equivalence(dense: torch.nn.Module, moe: MixtralForCausalLM, ids: torch.Tensor) -> float:
    """Max |logit difference| of the MoE with every expert on (zero router, top-k = E) vs the dense model."""
    probe = copy.deepcopy(moe)
    e, k = probe.config.num_local_experts, probe.config.num_experts_per_tok
    for layer in probe.model.layers:
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.top_k = layer.mlp.top_k = e
        layer.mlp.experts.down_proj.mul_(e / k)
    return float((probe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max())


def load_or_build_moe(dense, tok, calib, args) -> tuple[MixtralForCausalLM, str]:  # noqa: ANN001
    key = json.dumps(
        [args.model, args.experts, args.top_k, min(args.moefy_tokens, calib.numel()), args.temperature]
        + [calib[:2].tolist()]
    )
    folder = Path(os.path.expanduser("~/.cache/prunekit")) / (
        f"moefied-{args.experts}x{args.top_k}-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    )
    if (folder / "config.json").is_file():
        moe = AutoModelForCausalLM.from_pretrained(folder).eval()
        return moe, f"loaded from cache {folder}"
    t = time.perf_counter()
    moe = moefy(dense, calib, args.experts, args.top_k, args.moefy_tokens, args.temperature)
    err = check_dense_equivalence(dense, moe, calib[:1, :64])
    if err > 1e-3:
        raise SystemExit(f"MoEfication is not dense-equivalent with every expert on: max |dlogit| {err}")
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    moe.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.rename(tmp, folder)
    return moe, f"built in {time.perf_counter() - t:.0f} s (dense-equivalence check: max |dlogit| {err:.1e})"


# --- the benchmark -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval", dest="eval_text", default="wiki")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=12)
    ap.add_argument("--moefy-tokens", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=0.1, help="router logit std after the fit")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--metrics", default=",".join(EXPERT_METRICS))
    ap.add_argument("--blocks", default="best,bi", help="block planners for the same-parameters rows")
    ap.add_argument(
        "--width",
        default="",
        help="channel metrics for width rows at the same parameters (expert channels, KV groups), e.g. taylor",
    )
    ap.add_argument("--round-to", type=int, default=8, help="width rows: kept channels a multiple of this")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_pruning.md"))
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    metrics = [m for m in args.metrics.split(",") if m]

    t0 = time.perf_counter()
    dense, tok, _ = pk.load_model(args.model)
    calib = pk.load_windows(tok, args.calib, seq_len=args.calib_seq_len, num_windows=args.calib_windows).ids
    evalw = pk.load_windows(tok, args.eval_text, seq_len=args.eval_seq_len, num_windows=args.eval_windows).ids
    moe, how = load_or_build_moe(dense, tok, calib, args)
    log(f"MoE {args.experts} experts, top-{args.top_k}: {how}")
    rows: list[dict] = []
    dense_ppl = pk.perplexity(dense, evalw).perplexity
    rows.append(row("dense SmolLM2-135M", "-", 0, 0.0, dense_ppl, 0.0))
    del dense
    base_ppl = pk.perplexity(moe, evalw).perplexity
    ir = pk.inspect(moe)
    rows.append(row(f"MoEfied ({args.experts} experts, top-{args.top_k})", "-", 0, 0.0, base_ppl, 0.0))
    block_params = ir.block_params()
    for ratio in ratios:
        for metric in metrics:
            # where fewer than top_k experts are left, top_k becomes the number left (the router then
            # only weighs them); expert planners read the windows (no calibration pass)
            res = pk.prune(
                copy.deepcopy(moe),
                ratio=ratio,
                calib=calib,
                granularity="expert",
                metric=metric,
                top_k="clamp",
            )
            plan, plan_s, pruned = res.plan, res.timings["plan"], res.model
            ppl = pk.perplexity(pruned, evalw).perplexity
            rows.append(row(metric, f"{ratio:.0%} of experts", plan.removed_params, plan_s, ppl, ratio))
            del pruned, res
    # the parameters a uniform 25% expert plan removes: the budget of the block and width rows
    routed = [f for _s, f in ir.channel_groups().values() if f.router]
    same = sum(math.ceil(0.25 * f.count) * f.params_per_group for f in routed) / block_params
    for metric in [m for m in args.width.split(",") if m]:
        res = pk.prune(
            copy.deepcopy(moe),
            ratio=same,
            calib=calib,
            granularity="width",
            metric=metric,
            round_to=args.round_to,
        )
        plan, plan_s, pruned = res.plan, res.timings["plan"], res.model
        ppl = pk.perplexity(pruned, evalw).perplexity
        kinds = sorted({f.rsplit(".", 1)[-1] for f in plan.remove_groups})
        label = f"width ({metric}, repair {plan.repair}, uniform)"
        rows.append(
            row(label, f"{', '.join(kinds)}; >= 25%-expert params", plan.removed_params, plan_s, ppl, 0.25)
        )
        del pruned, res
    if args.blocks:
        cal = pk.calibrate(moe, calib)
        for planner in args.blocks.split(","):
            kwargs = {} if planner == "best" else {"metric": "bi", "granularity": "block", "repair": "none"}
            res = pk.prune(copy.deepcopy(moe), ratio=same, calib=calib, calibration=cal, **kwargs)
            plan, plan_s, pruned = res.plan, res.timings["plan"], res.model
            ppl = pk.perplexity(pruned, evalw).perplexity
            label = (
                f"whole blocks ({plan.method}{', repair ' + plan.repair if plan.repair != 'none' else ''})"
            )
            what = f"{len(plan.remove)} blocks, >= 25%-expert params"
            rows.append(row(label, what, plan.removed_params, plan_s, ppl, 0.25))
            del pruned, res
    table = render(rows, block_params, args, time.perf_counter() - t0, base_ppl)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return 0


def row(method: str, removed: str, params: int, plan_s: float, ppl: float, ratio: float) -> dict:
    r = {"method": method, "removed": removed, "params": params, "plan_s": plan_s, "ppl": ppl, "ratio": ratio}
    log(json.dumps(r))
    return r


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def render(rows: list[dict], block_params: int, args: argparse.Namespace, total_s: float, base: float) -> str:
    freq = {r["ratio"]: r["ppl"] for r in rows if r["method"] == "expert_frequency"}
    lines = [
        f"# Expert pruning on MoEfied {args.model}",
        "",
        f"MoE: {args.experts} experts of {1536 // args.experts} neurons per layer, top-{args.top_k}, router "
        f"fitted on {args.moefy_tokens} tokens of `{args.calib}`. Calibration: {args.calib_windows} x "
        f"{args.calib_seq_len} tokens of `{args.calib}`; evaluation: {args.eval_windows} x {args.eval_seq_len} "
        f"tokens of `{args.eval_text}`; fp32; no healing. Expert plans remove the same number of experts from "
        f"every layer. Block parameters of the MoE: {block_params}. torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; total {total_s / 60:.1f} min.",
        "",
        "| method | removed | params removed | of block params | perplexity | vs MoE | vs frequency | plan s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{r['ppl'] / freq[r['ratio']]:.3f}x" if r["ratio"] in freq else "-"
        lines.append(
            f"| {r['method']} | {r['removed']} | {r['params']} | {r['params'] / block_params:.1%} | "
            f"{r['ppl']:.2f} | {r['ppl'] / base:.2f}x | {rel} | {r['plan_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
