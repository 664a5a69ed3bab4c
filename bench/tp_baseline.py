"""Torch-Pruning 1.6.1 width-pruning baseline for Llama-architecture models (e.g. SmolLM2-135M).

:func:`prune_with_torch_pruning` prunes a transformers ``LlamaForCausalLM`` in place with Torch-Pruning's
``MetaPruner`` (DepGraph), configured as in Torch-Pruning's own LLM example (``examples/LLMs/prune_llm.py``:
``num_heads`` for q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False`` so RoPE stays intact, local
(per-layer) ranking, ``round_to=4``, ``lm_head`` ignored) with one deliberate change: the hidden (residual)
dimension is NOT pruned. Only two structures are removed:

* attention query heads, and
* FFN intermediate channels (``gate_proj``/``up_proj`` rows with the matching ``down_proj`` columns).

Embeddings, norms, ``lm_head`` and the hidden size are untouched. The budget is a fraction of the decoder
blocks' parameters (``model.model.layers``); at least that fraction is removed.

What Torch-Pruning 1.6.1 does (and does not do) with grouped-query attention -- read before comparing:

* It never removes KV heads. With GQA, ``MetaPruner`` removes the same number of *query* heads inside
  every KV group and explicitly leaves ``k_proj``/``v_proj`` unpruned ("disable head pruning for the kv
  layers if GQA is enabled"). Removing a whole KV group with its query heads is not something TP 1.6.1
  supports, so the baseline uses what TP does: SmolLM2's 9 query heads / 3 KV heads can become 6/3 or 3/3
  (``num_key_value_groups`` 2 or 1). Per-KV-group counts are rounded up by TP, so any positive head
  ratio below 1/3 removes one query head per KV group (3 of 9) in every layer -- 6.25 % of each block of
  SmolLM2-135M. TP's example sets ``head_pruning_ratio = pruning_ratio``; that is the default here.
* TP can only see GQA through ``repeat_kv`` (its ``_ExpandOp`` index mapping). transformers 5.x's SDPA
  path passes ``enable_gqa=True`` instead of repeating K/V, which TP traces as an element-wise op and maps
  k/v channels wrongly, so the dependency graph is traced with ``attn_implementation="eager"``; the
  model's previous attention implementation is restored afterwards.
* The hidden size is protected by the default ``pruning_ratio=0.0``; attention and FFN get their ratios
  through ``pruning_ratio_dict`` keyed by ``q_proj`` (the ratio there only opens TP's per-group pruning
  branch; with ``prune_head_dims=False`` no head dimension is removed) and ``gate_proj``. TP computes
  ``n_pruned = C - int(C * (1 - ratio))``; ratios are passed as ``(n - 0.5) / C`` so the integer count is
  exactly ``n`` despite float rounding.
* The FFN width is chosen (same for every layer, multiple of ``round_to`` remaining) as the smallest one
  that, together with the removed heads, reaches the budget.
* ``GroupHessianImportance.accumulate_grad`` in 1.6.1 keys its dictionaries by parameter but tests
  membership by name, so it keeps only the last sample's squared gradient. This module fills the
  accumulators itself (sum of squared per-window gradients and the window count) and lets TP's own
  ``__call__`` use them.
* Transformers config cannot express per-layer widths; with local (uniform) pruning every layer has the
  same widths, so ``config.num_attention_heads`` / ``intermediate_size`` are updated, ``head_dim`` is
  kept explicit and ``num_key_value_heads`` is unchanged.

Importances (``IMPORTANCES``): ``magnitude`` = ``GroupMagnitudeImportance(p=2)`` (TP's example uses the
same group L2 norm), ``taylor`` = ``GroupTaylorImportance()`` (first-order, gradients of the LM loss summed
over the calibration windows), ``hessian`` = ``GroupHessianImportance()`` (diagonal empirical Fisher from
per-window gradients, OBD). All use TP's defaults ``group_reduction="mean"``, ``normalizer="mean"``.

Needs the optional dependency ``torch-pruning==1.6.1``: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any

import torch
from torch import nn

__all__ = ["IMPORTANCES", "check_consistent", "prune_with_torch_pruning"]

#: Importance names accepted by :func:`prune_with_torch_pruning`.
IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor", "hessian")

#: Torch-Pruning's example rounds pruned widths to this multiple (only FFN channels are affected here).
ROUND_TO = 4

_TP_VERSION = "1.6.1"


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"bench/tp_baseline.py needs Torch-Pruning {_TP_VERSION}; install the bench extras with "
            f'`pip install -e ".[bench]"` (or `pip install torch-pruning=={_TP_VERSION}`).'
        ) from exc
    return tp


def _installed_version() -> str:
    try:
        return importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _block_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def _make_importance(tp, importance: str):
    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
    if importance == "hessian":
        return tp.importance.GroupHessianImportance(group_reduction="mean", normalizer="mean")
    raise ValueError(f"unknown importance {importance!r}; expected one of {IMPORTANCES}")


def _accumulate_gradients(
    model: nn.Module, windows: torch.Tensor, imp, importance: str, batch_size: int
) -> None:
    """Fill ``.grad`` (Taylor: summed LM-loss gradients) or the Hessian accumulators (per-window grad^2)."""
    model.zero_grad(set_to_none=True)
    if importance == "taylor":
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0]).backward()
        return
    # hessian: per-window gradients, squared and summed (TP's accumulate_grad keeps only the last one).
    accu: dict[nn.Parameter, torch.Tensor] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(windows.shape[0]):
        batch = windows[i : i + 1]
        model.zero_grad(set_to_none=False)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        for p in params:
            if p.grad is None:
                continue
            sq = p.grad.detach().pow(2)
            if p in accu:
                accu[p] += sq
            else:
                accu[p] = sq.clone()
    imp._accu_grad = accu
    imp._counter = dict.fromkeys(accu, int(windows.shape[0]))


def _plan(model: nn.Module, ratio: float, head_ratio: float) -> tuple[int, int]:
    """Query heads removed per KV group and FFN channels removed per layer (what TP will do)."""
    cfg = model.config
    n_layers = len(model.model.layers)
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    # TP (local pruning, GQA): ceil(ratio * n_q) heads, then ceil(that / n_kv) per KV group.
    per_group = 0
    if head_ratio > 0:
        per_group = math.ceil(math.ceil(head_ratio * n_q) / n_kv) if n_kv < n_q else 0
        if n_kv == n_q:  # plain MHA: TP removes ceil(ratio * n_q) heads
            per_group = math.ceil(head_ratio * n_q)
        per_group = min(per_group, n_q // n_kv - 1)  # keep at least one query head per KV group
    heads_removed = per_group * n_kv if n_kv < n_q else per_group
    per_head = head_dim * (attn.q_proj.in_features + attn.o_proj.out_features)
    if attn.q_proj.bias is not None:
        per_head += head_dim
    per_channel = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    per_channel += sum(int(m.bias is not None) for m in (mlp.gate_proj, mlp.up_proj))
    target = ratio * _block_params(model)
    missing = target - n_layers * heads_removed * per_head
    inter = mlp.gate_proj.out_features
    n_ffn = 0
    if missing > 0:
        n_ffn = math.ceil(missing / (n_layers * per_channel))
        keep = inter - n_ffn
        keep -= keep % ROUND_TO
        n_ffn = inter - keep
    if n_ffn >= inter:
        raise ValueError(f"ratio {ratio} needs more FFN channels than exist ({n_ffn} >= {inter})")
    return per_group, n_ffn


def _fix_attributes(model: nn.Module) -> tuple[list[int], list[int]]:
    cfg = model.config
    heads, ffn = [], []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n_q = attn.q_proj.out_features // attn.head_dim
        n_kv = attn.k_proj.out_features // attn.head_dim
        if n_q * attn.head_dim != attn.q_proj.out_features or n_q % n_kv:
            raise RuntimeError(f"illegal attention shape after pruning: q={n_q} heads, kv={n_kv} heads")
        attn.num_key_value_groups = n_q // n_kv
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, n_q)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = mlp.gate_proj.out_features
        heads.append(n_q)
        ffn.append(mlp.gate_proj.out_features)
    if len(set(heads)) != 1 or len(set(ffn)) != 1:
        raise RuntimeError(f"non-uniform widths after pruning: heads={heads}, ffn={ffn}")
    cfg.head_dim = model.model.layers[0].self_attn.head_dim
    cfg.num_attention_heads = heads[0]
    cfg.intermediate_size = ffn[0]
    return heads, ffn


def prune_with_torch_pruning(
    model: nn.Module,
    calib_windows: torch.Tensor,
    ratio: float,
    importance: str,
    *,
    head_pruning_ratio: float | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Prune ``model`` (a ``LlamaForCausalLM``) in place with Torch-Pruning; see the module docstring.

    ``calib_windows`` (``LongTensor [n, seq_len]``) feeds the gradients of ``taylor``/``hessian`` and one
    short slice of it traces the graph. ``head_pruning_ratio`` defaults to ``ratio`` as in TP's example
    (``0`` = FFN only). Returns ``wall_s`` (graph tracing, importance and pruning), ``removed_params``,
    ``block_params_before``, ``achieved_ratio``, ``heads_per_layer`` (query heads), ``ffn_per_layer``,
    ``importance`` and ``notes``.
    """
    tp = _import_tp()
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; expected one of {IMPORTANCES}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    ids = getattr(calib_windows, "ids", calib_windows)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError("calib_windows must be an integer tensor [n, seq_len] of token ids")
    device = next(model.parameters()).device
    ids = ids.long().to(device)
    head_ratio = ratio if head_pruning_ratio is None else float(head_pruning_ratio)

    t0 = time.perf_counter()
    cfg = model.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = model.model.layers
    block_before = _block_params(model)
    per_group, n_ffn = _plan(model, ratio, head_ratio)
    inter = layers[0].mlp.gate_proj.out_features

    was_training = model.training
    old_attn = getattr(cfg, "_attn_implementation", None)
    model.eval()
    model.set_attn_implementation("eager")  # TP maps GQA only through repeat_kv's expand
    imp = _make_importance(tp, importance)
    try:
        if importance != "magnitude":
            with torch.enable_grad():
                _accumulate_gradients(model, ids, imp, importance, batch_size)

        num_heads: dict[nn.Module, int] = {}
        ratio_dict: dict[nn.Module, float] = {}
        head_ratio_dict: dict[nn.Module, float] = {}
        for layer in layers:
            attn = layer.self_attn
            num_heads[attn.q_proj] = n_q
            num_heads[attn.k_proj] = n_kv
            num_heads[attn.v_proj] = n_kv
            if n_ffn:
                ratio_dict[layer.mlp.gate_proj] = (n_ffn - 0.5) / inter
            if per_group:
                # any ratio > 0 opens TP's pruning branch for the attention group; head dims are kept
                ratio_dict[attn.q_proj] = 0.5 / attn.q_proj.out_features
                # (k * n_kv - 0.5) / n_q -> TP's ceil(ceil(r * n_q) / n_kv) == k
                removed = per_group * n_kv if n_kv < n_q else per_group
                head_ratio_dict[attn.q_proj] = (removed - 0.5) / n_q
        norms = [m.weight for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        example = ids[:1, : min(16, ids.shape[1])]
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            importance=imp,
            global_pruning=False,
            pruning_ratio=0.0,  # hidden (residual) dimension: never pruned
            pruning_ratio_dict=ratio_dict,
            ignored_layers=[model.lm_head, model.model.embed_tokens],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.0,
            head_pruning_ratio_dict=head_ratio_dict,
            round_to=ROUND_TO,
            unwrapped_parameters=[(w, 0) for w in norms],
        )
        for group in pruner.step(interactive=True):
            group.prune()
        del pruner
    finally:
        model.zero_grad(set_to_none=True)
        if old_attn is not None:
            model.set_attn_implementation(old_attn)
        model.train(was_training)

    heads, ffn = _fix_attributes(model)
    wall = time.perf_counter() - t0
    block_after = _block_params(model)
    removed = block_before - block_after
    expect_heads = n_q - (per_group * n_kv if n_kv < n_q else per_group)
    if heads[0] != expect_heads or ffn[0] != inter - n_ffn:
        raise RuntimeError(
            f"Torch-Pruning removed a different amount than planned: heads {heads[0]} (planned "
            f"{expect_heads}), FFN {ffn[0]} (planned {inter - n_ffn})"
        )
    if any(layer.self_attn.k_proj.out_features != n_kv * layer.self_attn.head_dim for layer in layers):
        raise RuntimeError("Torch-Pruning changed the KV projections")
    if model.model.embed_tokens.weight.shape[1] != cfg.hidden_size:
        raise RuntimeError("Torch-Pruning changed the hidden size")
    notes = (
        f"torch-pruning {_installed_version()}, MetaPruner local ranking, prune_num_heads=True, "
        f"prune_head_dims=False, round_to={ROUND_TO}, head_pruning_ratio={head_ratio:g}; "
        f"query heads {n_q}->{heads[0]} ({per_group} per KV group removed, KV heads kept at {n_kv}); "
        f"FFN {inter}->{ffn[0]} per layer; hidden size, embeddings, norms, lm_head untouched"
    )
    return {
        "wall_s": wall,
        "removed_params": int(removed),
        "block_params_before": int(block_before),
        "achieved_ratio": removed / block_before,
        "heads_per_layer": heads,
        "ffn_per_layer": ffn,
        "importance": importance,
        "notes": notes,
    }


@torch.no_grad()
def check_consistent(
    model: nn.Module, *, seq_len: int = 24, seed: int = 0, dtype: torch.dtype | None = None
) -> float:
    """Max abs difference between full-forward logits and step-by-step KV-cached logits.

    Feeds ``seq_len`` random tokens once without a cache and once one token at a time through the
    model's cache (one token per step). ``dtype=None`` runs in the model's dtype; ``dtype=torch.float64``
    casts the model to float64 for the check and back afterwards (an exact round trip from float32), which
    separates surgery mistakes (differences of order 1e-1 or more) from float32 reduction-order noise
    (a pruned SmolLM2-135M shows 1e-3 in float32 even when pruning is exact; float64 gives ~1e-12).
    """
    was_training = model.training
    old_dtype = next(model.parameters()).dtype
    model.eval()
    if dtype is not None and dtype != old_dtype:
        model.to(dtype)
    try:
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen).to(device)
        full = model(input_ids=ids, use_cache=False).logits
        cache = None
        steps = []
        for t in range(seq_len):
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        cached = torch.cat(steps, dim=1)
        return float((full.double() - cached.double()).abs().max())
    finally:
        if dtype is not None and dtype != old_dtype:
            model.to(old_dtype)
        model.train(was_training)
