"""Performance ratios of prunekit, each measured side by side in one run (issue 8).

Sections (``--only a,b``; all by default):

* ``similarity``: one-pass similarity calibration (``calibrate``: bi, angular, sublayer_drop) vs one plain
  forward over the same windows and batches. Goal: at most 1.15x.
* ``trials``: removal-trial metrics (NRI over every sublayer, SLEB over every block, the greedy planner)
  with cached block inputs vs the naive method (a full model evaluation per trial), same scores; block
  forwards and wall time. Goal: at most 0.5x.
* ``streaming``: peak RSS of streaming calibration of a random Llama with 2L blocks vs L blocks (saved as
  safetensors shards under ``--tmp``, several GB, deleted afterwards), each in its own process; then the 2L
  model scored to completion under an address-space limit (RLIMIT_AS) below its weights' size, and the
  in-memory load under the same limit for contrast. Goal: ratio at most 1.1.
* ``throughput``: decode and prefill tokens/s of pruned vs unpruned models at 25% of block parameters, per
  granularity (blocks, sublayers, width, mixed on SmolLM2-135M; experts on a random Mixtral), against the
  ideal (parameter-proportional) speedup. Goal: at least 0.95x of ideal.
* ``save``: plan + surgery + ``save_pruned`` vs a plain ``save_pretrained`` of the same pruned model.
  Goal: at most 1.3x.

    flock /tmp/prunekit-heavy.lock python bench/perf.py --device cpu --out docs/results/perf.md

Timings take the best of ``--repeats`` interleaved runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402

SECTIONS = ("similarity", "trials", "streaming", "throughput", "save")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(fn: Any, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def machine(device: str) -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) // 1024**2
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, {mem} GiB RAM",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}",
        f"- device: {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else " (the cuda path was not run)"),
    ]
    return "\n".join(lines)


# --- similarity -------------------------------------------------------------------------------------


@torch.inference_mode()
def bench_similarity(model: Any, windows: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    bs = 8

    def plain() -> None:
        for s in range(0, windows.shape[0], bs):
            model(input_ids=windows[s : s + bs], use_cache=False)

    def one_pass() -> None:
        pk.calibrate(model, windows, batch_size=bs)

    plain()  # warm-up
    t_plain, t_cal = [], []
    for _ in range(args.repeats):
        t_plain.append(_best(plain, 1, args.device))
        t_cal.append(_best(one_pass, 1, args.device))
    return {"plain_s": min(t_plain), "calibrate_s": min(t_cal), "ratio": min(t_cal) / min(t_plain)}


# --- trials -----------------------------------------------------------------------------------------


def bench_trials(model: Any, windows: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    from prunekit_core.registry.plugins import get_metric, select_adapter
    from prunekit_core.scoring.calibration import ScoringContext

    adapter = select_adapter(model)
    ir = adapter.build_ir(model)
    cal = pk.calibrate(model, windows)
    rows = []
    for metric in ("nri", "sleb"):
        res: dict[bool, Any] = {}
        for _ in range(args.repeats):  # interleaved; the best wall time of each
            for naive in (False, True):
                ctx = ScoringContext(
                    model=model, adapter=adapter, ir=ir, calibration=cal, trial_windows=windows.shape[0]
                )
                ctx.naive_trials = naive
                t = time.perf_counter()
                s = get_metric(metric).score(ctx)
                dt = time.perf_counter() - t
                res[naive] = (s, min(dt, res[naive][1]) if naive in res else dt)
        (c, tc), (n, tn) = res[False], res[True]
        diff = max(abs(c.values[u] - n.values[u]) / max(abs(n.values[u]), 1e-12) for u in n.values)
        rows.append(
            {
                "what": f"{metric} ({len(n.values)} trials)",
                "cached_forwards": c.block_forwards,
                "naive_forwards": n.block_forwards,
                "cached_s": tc,
                "naive_s": tn,
                "max_rel_diff": diff,
            }
        )
    res = {}
    for naive in (False, True):
        t = time.perf_counter()
        plan = pk.plan_pruning(
            model,
            cal,
            ratio=args.greedy_ratio,
            metric="nri",
            planner="greedy",
            granularity="sublayer",
            trial_windows=windows.shape[0],
            naive_trials=naive,
        )
        note = next(n for n in plan.notes if "block forwards" in n)
        res[naive] = (plan, time.perf_counter() - t, int(note.split()[-3]), note.split()[0])
    (pc, tc, fc, nt), (pn, tn, fn, _) = res[False], res[True]
    rows.append(
        {
            "what": f"greedy nri planner, ratio {args.greedy_ratio} ({nt} trials, {len(pc.remove)} removals)",
            "cached_forwards": fc,
            "naive_forwards": fn,
            "cached_s": tc,
            "naive_s": tn,
            "max_rel_diff": 0.0 if pc.remove == pn.remove else float("nan"),
        }
    )
    return rows


# --- streaming --------------------------------------------------------------------------------------

_STREAM_CFG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def write_random_llama(folder: Path, layers: int, seed: int = 0) -> int:
    """A random Llama written shard by shard (one block per shard), never whole in memory; bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(num_hidden_layers=layers, **_STREAM_CFG)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    def block(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(h, h),
            p + "self_attn.v_proj.weight": rnd(h, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(f, h),
            p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }

    weight_map: dict[str, str] = {}
    total = 0
    parts = [
        (
            "outside.safetensors",
            lambda: {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h)},
        )
    ]
    parts += [(f"block-{i:03d}.safetensors", lambda i=i: block(i)) for i in range(layers)]
    for name, make in parts:  # one shard in memory at a time
        tensors = make()
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def link_prefix(src: Path, dst: Path, layers: int) -> int:
    """A folder holding the first ``layers`` blocks of ``src`` (symlinked shards); bytes of its weights."""
    from transformers import LlamaConfig

    dst.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig.from_pretrained(src)
    cfg.num_hidden_layers = layers
    cfg.save_pretrained(dst)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {
        k: f
        for k, f in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    for f in set(keep.values()):
        (dst / f).symlink_to(src / f)
    total = sum((src / f).stat().st_size for f in set(keep.values()))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": keep})
    )
    return total


def _vm_hwm_gb() -> float:
    """This process's peak RSS (VmHWM: per address space, unlike ru_maxrss, which a child inherits from
    the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _child(mode: str, folder: str, limit_gb: float, windows: int, seq_len: int, metrics: str = "bi") -> None:
    """Run in a subprocess: stream-score ``metrics`` (or load in memory) ``folder``; print one JSON line."""
    out: dict[str, Any] = {"mode": mode}
    if limit_gb > 0:
        lim = int(limit_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        out["rlimit_as_gb"] = limit_gb
    ids = torch.randint(3, 30000, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    try:
        if mode == "stream":
            from prunekit_core.scoring.streaming import open_streaming, stream_calibrate, stream_score

            names = metrics.split(",")
            sm = open_streaming(folder)
            # metrics that read weights or per-block statistics are computed while each block is loaded
            cal = stream_calibrate(sm, ids, batch_size=windows, metrics=names)
            bi = stream_score(sm, cal, "bi").values
            out.update(blocks=len(bi), loaded_gb=sm.loaded_bytes / 1e9, bi_min=min(bi, key=bi.get))
            out["observed"] = sorted(cal.observed)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder)
            cal = pk.calibrate(model, ids, batch_size=windows)
            out.update(blocks=len(cal.towers["text"].block_cos))
        out["ok"] = True
    except (MemoryError, RuntimeError, OSError) as exc:
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_gb"] = _vm_hwm_gb()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(mode: str, folder: Path, args: argparse.Namespace, limit_gb: float = 0.0) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        str(folder),
        str(limit_gb),
        str(args.stream_windows),
        str(args.stream_seq_len),
        args.stream_metrics,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"mode": mode, "ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}


def bench_streaming(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="prunekit-perf-", dir=args.tmp))
    try:
        big, small = root / f"llama-{2 * args.stream_layers}L", root / f"llama-{args.stream_layers}L"
        t = time.perf_counter()
        big_bytes = write_random_llama(big, 2 * args.stream_layers)
        small_bytes = link_prefix(big, small, args.stream_layers)
        write_s = time.perf_counter() - t
        r_small = _run_child("stream", small, args)
        r_big = _run_child("stream", big, args)
        limited = _run_child("stream", big, args, limit_gb=args.limit_gb)
        inmem = _run_child("memory", big, args, limit_gb=args.limit_gb)
        return {
            "small_gb": small_bytes / 1e9,
            "big_gb": big_bytes / 1e9,
            "write_s": write_s,
            "small": r_small,
            "big": r_big,
            "ratio": r_big.get("peak_rss_gb", float("nan")) / r_small.get("peak_rss_gb", float("nan")),
            "limited": limited,
            "in_memory_limited": inmem,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- throughput -------------------------------------------------------------------------------------


def _params(model: Any) -> int:
    return pk.count_parameters(model).total


def _active_params(model: Any) -> int:
    """Parameters a token goes through: experts counted top_k / num_experts (routed MoE)."""
    cfg = model.config
    e, k = getattr(cfg, "num_local_experts", None), getattr(cfg, "num_experts_per_tok", None)
    total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if ".experts." in name and e and k:
            n = n * min(k, p.shape[0]) // p.shape[0]
        total += n
    return total


@torch.inference_mode()
def _speeds(model: Any, device: str, args: argparse.Namespace) -> tuple[float, float]:
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    long = torch.randint(3, 1000, (1, args.prefill_len), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    n = args.decode_tokens

    def decode() -> None:
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def prefill() -> None:
        model(input_ids=long, use_cache=False)

    return n / _best(decode, 1, device), args.prefill_len / _best(prefill, 1, device)


def _mixed_plan(model: Any, cal: Any, ratio: float) -> Any:
    """Blocks and channels together: half the budget from whole blocks (bi), the rest from channels
    (magnitude) of the blocks that stay (the mixed planner itself measures each candidate: too slow here)."""
    blocks = pk.plan_pruning(model, cal, ratio=ratio / 2, metric="bi", granularity="block", planner="rank")
    width = pk.plan_pruning(model, cal, ratio=ratio / 2 + 0.02, metric="magnitude", granularity="width")
    gone = tuple(u + "." for u in blocks.remove)
    groups = {f: g for f, g in width.remove_groups.items() if not f.startswith(gone)}
    return width.model_copy(update={"remove": blocks.remove, "remove_groups": groups, "granularity": "mixed"})


def bench_throughput(model: Any, cal: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    r = args.ratio
    plans = {
        "blocks (bi)": lambda m: pk.plan_pruning(
            m, cal, ratio=r, metric="bi", granularity="block", planner="rank"
        ),
        "sublayers (sublayer_drop)": lambda m: pk.plan_pruning(
            m, cal, ratio=r, metric="sublayer_drop", granularity="sublayer", planner="rank"
        ),
        "width (magnitude, uniform)": lambda m: pk.plan_pruning(
            m, cal, ratio=r, metric="magnitude", granularity="width"
        ),
        "width (magnitude, per-layer)": lambda m: pk.plan_pruning(
            m, cal, ratio=r, metric="magnitude", granularity="width", width_allocation="global"
        ),
        "mixed (bi blocks + magnitude width)": lambda m: _mixed_plan(m, cal, r),
    }
    models: dict[str, Any] = {"unpruned": model}
    for label, make in plans.items():
        m = copy.deepcopy(model)
        plan = make(model)
        applied = pk.apply_plan(m, plan)
        models[label] = m
        if label.startswith("width") and applied.plan.is_uniform:
            # the same shape built from its config, no surgery: what the shape itself runs at
            torch.manual_seed(0)
            models[label + ": same shape built fresh"] = type(m)(copy.deepcopy(m.config)).eval()
    moe = _moe_models(args)
    rows = _measure(models, "unpruned", args, "SmolLM2-135M", _params)
    rows += _measure(moe, "unpruned", args, "random Mixtral", _active_params)
    return rows


def _moe_models(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    base = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(3, 30000, (4, 64), generator=torch.Generator().manual_seed(0))
    cal = pk.Calibration(windows=ids)
    pruned = copy.deepcopy(base)
    plan = pk.plan_pruning(base, cal, ratio=args.ratio, metric="magnitude", granularity="expert")
    pk.apply_plan(pruned, plan)
    return {"unpruned": base, f"experts (magnitude, {args.ratio:g} of experts per layer)": pruned}


def _measure(
    models: dict[str, Any], base: str, args: argparse.Namespace, name: str, count: Any
) -> list[dict[str, Any]]:
    speeds: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for m in models.values():
        m.to(args.device)
        _speeds(m, args.device, args)  # warm-up
    for _ in range(args.repeats):  # interleaved: slow phases of a shared machine hit every model
        for k, m in models.items():
            speeds[k].append(_speeds(m, args.device, args))
    best = {k: (max(d for d, _ in v), max(p for _, p in v)) for k, v in speeds.items()}
    p0 = count(models[base])
    rows = []
    for k, m in models.items():
        ideal = p0 / count(m)
        dec, pre = best[k][0] / best[base][0], best[k][1] / best[base][1]
        rows.append(
            {
                "model": name,
                "what": k,
                "params": count(m),
                "ideal": ideal,
                "decode_tps": best[k][0],
                "prefill_tps": best[k][1],
                "decode_speedup": dec,
                "prefill_speedup": pre,
                "decode_of_ideal": dec / ideal,
                "prefill_of_ideal": pre / ideal,
            }
        )
    for m in models.values():
        m.to("cpu")
    return rows


# --- save -------------------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for f in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bench_save(model: Any, cal: Any, tok: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from prunekit_core.io import atomic
    from prunekit_core.io.checkpoint import save_pruned

    root = Path(tempfile.mkdtemp(prefix="prunekit-save-", dir=args.tmp))
    rows = []
    try:
        for label, kw in {
            "blocks (bi rank)": dict(metric="bi", granularity="block", planner="rank"),
            "width (magnitude, per-layer)": dict(
                metric="magnitude", granularity="width", width_allocation="global"
            ),
        }.items():
            runs: dict[str, list[float]] = {}
            for i in range(args.save_repeats + 1):  # the first round warms up (page cache, allocator)
                m = copy.deepcopy(model)
                gc.collect()
                t0 = time.perf_counter()
                plan = pk.plan_pruning(m, cal, ratio=args.ratio, **kw)
                t1 = time.perf_counter()
                plan = pk.apply_plan(m, plan).plan
                t2 = time.perf_counter()
                times = {"plan": t1 - t0, "apply": t2 - t1}
                kinds = ["ours", "late", "plain"]
                for kind in kinds[i % 3 :] + kinds[: i % 3]:  # rotate the order: no save always goes first
                    os.sync()  # nothing left to write back from the previous save
                    folder = root / f"{kind}-{i}"
                    atomic.EARLY_WRITEBACK = kind != "late"  # late: disk writes started only by the fsyncs
                    try:
                        ts = time.perf_counter()
                        if kind == "plain":
                            m.save_pretrained(folder)
                            tok.save_pretrained(folder)
                            times["plain"] = time.perf_counter() - ts
                            _fsync_tree(folder)  # the durability save_pruned gives (it fsyncs)
                            times["synced"] = time.perf_counter() - ts
                        else:
                            save_pruned(m, folder, tokenizer=tok, plan=plan)
                            times["save" if kind == "ours" else "late"] = time.perf_counter() - ts
                    finally:
                        atomic.EARLY_WRITEBACK = True
                for kind in kinds:
                    shutil.rmtree(root / f"{kind}-{i}")
                del m
                if i == 0:
                    continue
                for k, v in times.items():
                    runs.setdefault(k, []).append(v)
            best = {k: statistics.median(v) for k, v in runs.items()}
            ours = best["plan"] + best["apply"] + best["save"]
            rows.append(
                {
                    "what": label,
                    "plan_s": best["plan"],
                    "apply_s": best["apply"],
                    "save_s": best["save"],
                    "late_s": best["late"],
                    "ours_s": ours,
                    "plain_s": best["plain"],
                    "ratio": ours / best["plain"],
                    "surgery_save_ratio": (best["apply"] + best["save"]) / best["plain"],
                    "synced_s": best["synced"],
                    "synced_ratio": ours / best["synced"],
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


# --- report -----------------------------------------------------------------------------------------


def _ok(value: float, goal: float, *, at_most: bool) -> str:
    good = value <= goal if at_most else value >= goal
    return "yes" if good else "**no**"


def render(res: dict[str, Any], args: argparse.Namespace, cmd: str) -> str:
    out = [
        "# prunekit performance ratios (bench/perf.py)",
        "",
        f"Command: `{cmd}`",
        "",
        machine(args.device),
        "",
    ]
    if "similarity" in res:
        s = res["similarity"]
        out += [
            "## One-pass similarity scoring vs one plain forward",
            "",
            f"SmolLM2-135M, {args.windows} windows x {args.seq_len} tokens, batches of 8, best of {args.repeats}.",
            "",
            "| plain forward (s) | calibrate (s) | ratio | goal <= 1.15 |",
            "|---:|---:|---:|:--|",
            f"| {s['plain_s']:.2f} | {s['calibrate_s']:.2f} | {s['ratio']:.3f} | {_ok(s['ratio'], 1.15, at_most=True)} |",
            "",
        ]
    if "trials" in res:
        out += [
            "## Removal trials: cached block inputs vs a full model evaluation per trial",
            "",
            f"SmolLM2-135M (30 blocks), {args.trial_windows} windows x {args.trial_seq_len} tokens, loss on every 4th "
            "position (both methods); the naive method runs the embeddings, every kept block and the head per "
            "trial. Scores compared unit by unit (max relative difference; for the planner: same plan = 0).",
            "",
            "| trials | block forwards cached / naive | ratio | wall s cached / naive | ratio | max rel diff | goal <= 0.5 |",
            "|:--|---:|---:|---:|---:|---:|:--|",
        ]
        for r in res["trials"]:
            fr = r["cached_forwards"] / r["naive_forwards"]
            wr = r["cached_s"] / r["naive_s"]
            out.append(
                f"| {r['what']} | {r['cached_forwards']} / {r['naive_forwards']} | {fr:.3f} | "
                f"{r['cached_s']:.1f} / {r['naive_s']:.1f} | {wr:.3f} | {r['max_rel_diff']:.1e} | "
                f"{_ok(max(fr, wr), 0.5, at_most=True)} |"
            )
        out.append("")
    if "streaming" in res:
        s = res["streaming"]
        out += [
            "## Streaming calibration: peak RSS vs depth, and a model larger than the memory limit",
            "",
            f"Random Llama (hidden {_STREAM_CFG['hidden_size']}, FFN {_STREAM_CFG['intermediate_size']}, vocab "
            f"{_STREAM_CFG['vocab_size']}, fp32, one safetensors shard per block), "
            f"{args.stream_windows} windows x {args.stream_seq_len} tokens, scores of {args.stream_metrics}; each run in its own process "
            f"(peak RSS = VmHWM of that process). Weights written in {s['write_s']:.0f} s to a temporary folder, deleted "
            "afterwards.",
            "",
            "| run | weights (GB) | address-space limit | finished | peak RSS (GB) | s |",
            "|:--|---:|:--|:--|---:|---:|",
        ]
        for label, key, gb in (
            (f"stream {args.stream_layers} blocks", "small", s["small_gb"]),
            (f"stream {2 * args.stream_layers} blocks", "big", s["big_gb"]),
            (f"stream {2 * args.stream_layers} blocks, limited", "limited", s["big_gb"]),
            (f"in memory {2 * args.stream_layers} blocks, limited", "in_memory_limited", s["big_gb"]),
        ):
            r = s[key]
            lim = f"{r['rlimit_as_gb']:g} GB (RLIMIT_AS)" if r.get("rlimit_as_gb") else "none"
            fin = "yes" if r.get("ok") else f"no ({r.get('error', '?')})"
            out.append(
                f"| {label} | {gb:.2f} | {lim} | {fin} | {r.get('peak_rss_gb', float('nan')):.2f} | "
                f"{r.get('seconds', float('nan')):.0f} |"
            )
        out += [
            "",
            f"Peak RSS ratio {2 * args.stream_layers} blocks / {args.stream_layers} blocks: **{s['ratio']:.3f}** "
            f"(goal <= 1.1: {_ok(s['ratio'], 1.1, at_most=True)}).",
            "",
        ]
    if "throughput" in res:
        out += [
            "## Throughput of pruned models",
            "",
            f"Decode: {args.decode_tokens} new tokens after a 16-token prompt, batch 1, greedy, KV cache; prefill: "
            f"one forward over {args.prefill_len} tokens. Best of {args.repeats} interleaved runs. Ideal speedup = "
            "parameters before / after (SmolLM2, head and embeddings included) or parameters a token passes "
            "through (Mixtral: experts counted top_k / num_experts, which removing experts does not change).",
            "",
            "| model | pruned at ratio "
            + f"{args.ratio:g}"
            + " | params | ideal | decode tok/s | decode speedup "
            "| of ideal | prefill tok/s | prefill speedup | of ideal | goal >= 0.95 |",
            "|:--|:--|---:|---:|---:|---:|---:|---:|---:|---:|:--|",
        ]
        for r in res["throughput"]:
            ok = _ok(min(r["decode_of_ideal"], r["prefill_of_ideal"]), 0.95, at_most=False)
            out.append(
                f"| {r['model']} | {r['what']} | {r['params'] / 1e6:.1f}M | {r['ideal']:.3f} | {r['decode_tps']:.1f} "
                f"| {r['decode_speedup']:.3f} | {r['decode_of_ideal']:.3f} | {r['prefill_tps']:.0f} | "
                f"{r['prefill_speedup']:.3f} | {r['prefill_of_ideal']:.3f} | {ok if r['what'] != 'unpruned' else ''} |"
            )
        out.append("")
    if "save" in res:
        out += [
            "## Plan + surgery + save vs a plain save_pretrained",
            "",
            "SmolLM2-135M, ratio "
            + f"{args.ratio:g}"
            + " from a calibration made beforehand; ours = plan_pruning + "
            "apply_plan + save_pruned (atomic, with tokenizer and plan); plain = save_pretrained of the same pruned "
            "model + its tokenizer; plain + fsync adds an fsync of its files and folder (save_pruned is atomic and "
            "durable: it fsyncs before the rename; a background thread starts the disk writes while the files are "
            "written, and the late column is the same save with that thread off). The width planner measures "
            f"removal trials to allocate widths (the plan column). Medians of {args.save_repeats} rounds after one "
            "warm-up round; in each round the three saves run in a rotated order, each after an `os.sync()`.",
            "",
            "| plan | plan (s) | surgery (s) | save_pruned (s) | late (s) | ours total (s) | plain save_pretrained (s) "
            "| ratio | goal <= 1.3 | (surgery + save) / plain | plain + fsync (s) | ours / (plain + fsync) |",
            "|:--|---:|---:|---:|---:|---:|---:|---:|:--|---:|---:|---:|",
        ]
        for r in res["save"]:
            out.append(
                f"| {r['what']} | {r['plan_s']:.2f} | {r['apply_s']:.2f} | {r['save_s']:.2f} | {r['late_s']:.2f} | "
                f"{r['ours_s']:.2f} | "
                f"{r['plain_s']:.2f} | {r['ratio']:.3f} | {_ok(r['ratio'], 1.3, at_most=True)} | "
                f"{r['surgery_save_ratio']:.3f} | {r['synced_s']:.2f} | {r['synced_ratio']:.3f} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, mode, folder, limit, windows, seq_len, metrics = sys.argv
        _child(mode, folder, float(limit), int(windows), int(seq_len), metrics)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--windows", type=int, default=16, help="similarity: calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--trial-windows", type=int, default=4)
    ap.add_argument("--trial-seq-len", type=int, default=128)
    ap.add_argument("--greedy-ratio", type=float, default=0.2)
    ap.add_argument("--ratio", type=float, default=0.25, help="throughput and save: fraction of block params")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--stream-layers", type=int, default=10, help="L: models of L and 2L blocks")
    ap.add_argument("--stream-windows", type=int, default=4)
    ap.add_argument("--stream-seq-len", type=int, default=128)
    ap.add_argument(
        "--stream-metrics",
        default="bi",
        help="streaming: comma-separated metrics scored in the pass (bi always; e.g. bi,wanda,obs,bi_lsq)",
    )
    ap.add_argument("--limit-gb", type=float, default=3.0, help="RLIMIT_AS of the limited runs (GB)")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save-repeats", type=int, default=6, help="save: rounds (medians are reported)")
    ap.add_argument("--out", default=None, help="also write the Markdown here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "streaming" in only:  # first: the least memory in use in this process
        res["streaming"] = bench_streaming(args)
        print(json.dumps({"streaming": res["streaming"]}), file=sys.stderr, flush=True)
    if any(s in only for s in ("similarity", "trials", "throughput", "save")):
        model, tok, _ = pk.load_model(args.model)
        model.to(args.device)
        windows = pk.load_windows(tok, args.calib, seq_len=args.seq_len, num_windows=args.windows).ids
        windows = windows.to(args.device)
        if "similarity" in only:
            res["similarity"] = bench_similarity(model, windows, args)
            print(json.dumps({"similarity": res["similarity"]}), file=sys.stderr, flush=True)
        if "trials" in only:
            res["trials"] = bench_trials(model, windows[: args.trial_windows, : args.trial_seq_len], args)
            print(json.dumps({"trials": res["trials"]}), file=sys.stderr, flush=True)
        model.to("cpu")
        windows = windows.cpu()
        cal = pk.calibrate(model, windows[:4])
        if "throughput" in only:
            res["throughput"] = bench_throughput(model, cal, args)
            print(json.dumps({"throughput": res["throughput"]}), file=sys.stderr, flush=True)
        if "save" in only:
            res["save"] = bench_save(model, cal, tok, args)
            print(json.dumps({"save": res["save"]}), file=sys.stderr, flush=True)
    cmd = "python bench/perf.py " + " ".join(sys.argv[1:])
    text = render(res, args, cmd) + f"\nTotal run time {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
