"""Multimodal pruning: a LLaVA-style model with the pretrained SmolLM2-135M language model.

No pretrained CLIP/SigLIP weights install offline (../shared/ASSETS.md), so the vision tower (a CLIP ViT,
``--vision-layers`` blocks of width 384 on 224 px images in 16 px patches) and the projector are randomly
initialised and seeded; the language model is SmolLM2-135M, copied into a stock
``LlavaForConditionalGeneration`` (``vision_feature_layer=-2``, as LLaVA-1.5). Quality on the vision side
is therefore measured as image-feature fidelity (mean cosine between the projector's outputs before and
after pruning, on held-out images), not accuracy; text quality as perplexity on text that follows an
image (the image's placeholder tokens are not scored).

Protocol (one run, the same windows for every row): calibrate on c4 (``--calib-windows`` x 128 text
tokens, each window behind one of scikit-image's first 8 sample photographs), evaluate on wiki
(``--eval-windows`` x 256 text tokens, each behind one of the other 7 photographs), fp32, no healing.
Rows: the unpruned model; the vision tower pruned (``--vision-ratio`` of its block parameters: the unused
last block alone, prunekit's block similarity on the vision stream, and the same ratio from the first
blocks as a naive baseline); the language model pruned (``--text-ratio``, prunekit's best planner:
angular span + least-squares repair); and both (the vision plan, then the text plan made on the result).

    flock /tmp/prunekit-heavy.lock python bench/multimodal_pruning.py    # a few minutes on 2 cores

Writes the Markdown table to stdout and to ``--out`` (default bench/results/multimodal_pruning.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prunekit_core as pk  # noqa: E402
from prunekit_core.adapters.vision import feature_fidelity, image_features  # noqa: E402


def build_llava(text_model: torch.nn.Module, vision_layers: int, seed: int) -> LlavaForConditionalGeneration:
    """A LLaVA whose language model is ``text_model``'s (weights shared by copy) and whose vision tower
    and projector are seeded random."""
    text_config = copy.deepcopy(text_model.config)
    vision = CLIPVisionConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=vision_layers,
        num_attention_heads=6,
        image_size=224,
        patch_size=16,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=text_config.vocab_size - 1,
        image_seq_length=(224 // 16) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.model.language_model.load_state_dict(
        text_model.model.state_dict(), strict=True
    )
    assert not missing and not unexpected
    if not text_config.tie_word_embeddings:
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, text_model.lm_head.weight)
    return model


def image_windows(model, text_ids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each text window behind one image's placeholder tokens (images cycled): ids ``[n, image + text]``."""
    n_image = image_features(model, images[:1]).shape[0]
    ids = torch.full((text_ids.shape[0], n_image + text_ids.shape[1]), model.config.image_token_id)
    ids[:, n_image:] = text_ids
    return ids, n_image


@torch.inference_mode()
def text_perplexity(model, ids: torch.Tensor, images: torch.Tensor, n_image: int, batch: int = 4) -> float:
    """Perplexity of the text after the image (placeholder positions are context, never scored)."""
    nll, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch]
        pv = images[torch.arange(start, start + chunk.shape[0]) % images.shape[0]]
        logits = model(input_ids=chunk, pixel_values=pv, use_cache=False).logits
        pred = logits[:, n_image:-1].float()
        target = chunk[:, n_image + 1 :]
        nll += float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return float(torch.exp(torch.tensor(nll / count)))


def tower_params(model) -> dict[str, int]:
    ir = pk.inspect(model)
    return {t.name: sum(b.params for b in t.blocks) for t in ir.towers if t.blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-layers", type=int, default=12)
    ap.add_argument("--vision-ratio", type=float, default=0.25)
    ap.add_argument("--text-ratio", type=float, default=0.1)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/multimodal_pruning.md"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    from prunekit_llava.images import sample_images, to_pixel_values

    smol, tok, _ = pk.load_model("smollm2-135m")
    base = build_llava(smol, args.vision_layers, args.seed)
    del smol
    photos = sample_images()
    calib_images = to_pixel_values(photos[:8], 224)
    eval_images = to_pixel_values(photos[8:], 224)
    calib_text = pk.load_windows(tok, "c4", seq_len=128, num_windows=args.calib_windows).ids
    eval_text = pk.load_windows(tok, "wiki", seq_len=256, num_windows=args.eval_windows).ids
    image_token = base.config.image_token_id
    assert not (calib_text == image_token).any() and not (eval_text == image_token).any()
    calib_ids, n_image = image_windows(base, calib_text, calib_images)
    eval_ids, _ = image_windows(base, eval_text, eval_images)
    calib_pv = calib_images[torch.arange(calib_ids.shape[0]) % calib_images.shape[0]]
    feats_base = image_features(base, eval_images)
    params_base = tower_params(base)

    rows: list[dict] = []

    def measure(name: str, model, plan_note: str, seconds: float | None = None) -> None:
        params = tower_params(model)
        row = {
            "name": name,
            "vision": 1 - params["vision"] / params_base["vision"],
            "text": 1 - params["text"] / params_base["text"],
            "ppl": text_perplexity(model, eval_ids, eval_images, n_image),
            "fidelity": feature_fidelity(feats_base, image_features(model, eval_images)),
            "plan": plan_note,
            "seconds": seconds,
        }
        rows.append(row)
        print(f"{name}: {row}", flush=True)

    def plan_and_apply(model, scope: str, ratio: float, **kw):
        t0 = time.perf_counter()
        # the calibration pass with this benchmark's photos; the pipeline plans, and repairs on the text
        cal = pk.calibrate(model, calib_ids, inputs={"pixel_values": calib_pv})
        calibrate_s = time.perf_counter() - t0
        res = pk.prune(model, ratio=ratio, calib=calib_text, calibration=cal, scope=[scope], **kw)
        return res.plan, calibrate_s + res.timings["plan"] + res.timings["apply"]

    measure("unpruned", base, "")

    n_vision = args.vision_layers
    dead = copy.deepcopy(base)
    ir = pk.inspect(dead)
    pk.apply_plan(
        dead, pk.PrunePlan(fingerprint=pk.fingerprint(dead, ir), remove=[f"vision.blocks.{n_vision - 1}"])
    )
    measure("vision: unused last block (feature layer -2 -> -1)", dead, f"vision.blocks.{n_vision - 1}")

    vision_bi = copy.deepcopy(base)
    plan_v, secs = plan_and_apply(vision_bi, "vision", args.vision_ratio, metric="bi")
    measure(
        f"vision {args.vision_ratio:.0%}: block similarity (bi)", vision_bi, ", ".join(plan_v.remove), secs
    )

    vision_first = copy.deepcopy(base)
    k = len(plan_v.remove)
    ir = pk.inspect(vision_first)
    first = [f"vision.blocks.{i}" for i in range(k)]
    pk.apply_plan(vision_first, pk.PrunePlan(fingerprint=pk.fingerprint(vision_first, ir), remove=first))
    measure(f"vision {args.vision_ratio:.0%}: first {k} blocks (naive)", vision_first, ", ".join(first))

    text = copy.deepcopy(base)
    plan_t, secs = plan_and_apply(text, "text", args.text_ratio)
    measure(
        f"text {args.text_ratio:.0%}: prunekit best ({plan_t.method}, repair {plan_t.repair})",
        text,
        ", ".join(plan_t.remove),
        secs,
    )

    both = copy.deepcopy(vision_bi)
    plan_b, secs = plan_and_apply(both, "text", args.text_ratio)
    measure("both: vision (bi) then text (best)", both, ", ".join(plan_v.remove + plan_b.remove), secs)

    minutes = (time.perf_counter() - t_start) / 60
    lines = [
        f"LLaVA-style: random CLIP ViT ({n_vision} x 384, 224 px / 16 px patches, {n_image} image tokens) + "
        f"random projector + SmolLM2-135M; calibration {args.calib_windows} x 128 c4 tokens behind 8 photos, "
        f"evaluation {args.eval_windows} x 256 wiki tokens behind 7 other photos; {minutes:.1f} min",
        "",
        "| model | vision block params removed | text block params removed | text ppl after an image | "
        "image-feature fidelity | removed units | planning s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['name']} | {r['vision']:.1%} | {r['text']:.1%} | {r['ppl']:.3f} | {r['fidelity']:.6f} | "
            f"{r['plan']} | {secs} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
