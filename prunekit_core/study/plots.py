"""Plots of importance scores (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..io.atomic import atomic_path
from ..scoring.metrics import Scores

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REMOVED_COLOR = "#d62728"
BLOCK_COLOR = "#7f7f7f"
SUBLAYER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")  # attention, mlp, then others


def _split(unit_id: str) -> tuple[str, str | None]:
    """``text.blocks.3`` -> (``text.blocks.3``, None); ``text.blocks.3.attn`` -> (``text.blocks.3``, ``attn``)."""
    head, _, last = unit_id.rpartition(".")
    if last.isdigit():
        return unit_id, None
    return head, last


def _index(block_id: str) -> int | str:
    last = block_id.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else block_id


def _set_scale(ax: Axes, values: list[float]) -> None:
    # block scores span orders of magnitude (the first block dwarfs the rest): a log axis keeps all visible
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def plot_scores(
    block_scores: Scores,
    sublayer_scores: Scores,
    removed: list[str],
    path: str | Path,
    *,
    chosen_by: str | None = None,
) -> Path:
    """Write a PNG with two panels and return its path.

    Top: one bar per block (``block_scores``, e.g. BI). Bottom: one bar per sublayer (``sublayer_scores``,
    e.g. sublayer_drop), attention and MLP in two colors. Units in ``removed`` are drawn in red with a
    hatch; sublayers of a removed block count as removed. ``chosen_by`` names the method that chose the
    removed units (``plan.method``, e.g. ``rank:angular``) when it is not the metric plotted: the title
    says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    removed_set = set(removed)
    blocks = list(block_scores.values)
    x_of = {b: i for i, b in enumerate(blocks)}
    for uid in sublayer_scores.values:
        parent, _ = _split(uid)
        x_of.setdefault(parent, len(x_of))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.32 * len(x_of) + 3), 7.5), sharex=True)
    try:
        ys = [block_scores.values[b] for b in blocks]
        colors = [REMOVED_COLOR if b in removed_set else BLOCK_COLOR for b in blocks]
        bars = top.bar([x_of[b] for b in blocks], ys, color=colors)
        for bar, b in zip(bars, blocks, strict=True):
            if b in removed_set:
                bar.set_hatch("//")
        top.set_ylabel(f"{block_scores.metric} (higher = keep)")
        chooser = f", chosen by {chosen_by}" if chosen_by else ""
        top.set_title(f"per-block {block_scores.metric} scores; removed units in red{chooser}")
        _set_scale(top, ys)

        kinds: list[str] = []
        for uid in sublayer_scores.values:
            kind = _split(uid)[1] or "?"
            if kind not in kinds:
                kinds.append(kind)
        width = 0.8 / max(1, len(kinds))
        all_y: list[float] = []
        for k, kind in enumerate(kinds):
            units = [u for u in sublayer_scores.values if (_split(u)[1] or "?") == kind]
            xs = [x_of[_split(u)[0]] - 0.4 + width * (k + 0.5) for u in units]
            ys_k = [sublayer_scores.values[u] for u in units]
            all_y += ys_k
            gone = [u in removed_set or _split(u)[0] in removed_set for u in units]
            bars = bottom.bar(
                xs,
                ys_k,
                width=width,
                color=SUBLAYER_COLORS[k % len(SUBLAYER_COLORS)],
                edgecolor=[REMOVED_COLOR if g else "none" for g in gone],
                linewidth=[2.0 if g else 0.0 for g in gone],
                label=kind,
            )
            for bar, g in zip(bars, gone, strict=True):
                if g:
                    bar.set_hatch("xx")
                    bar.set_alpha(0.55)
        handles = [
            Patch(color=SUBLAYER_COLORS[k % len(SUBLAYER_COLORS)], label=kind) for k, kind in enumerate(kinds)
        ] + [Patch(facecolor="white", edgecolor=REMOVED_COLOR, hatch="xx", label="removed")]
        bottom.legend(handles=handles, loc="upper right")
        bottom.set_ylabel(f"{sublayer_scores.metric} (higher = keep)")
        bottom.set_title(f"per-sublayer {sublayer_scores.metric} scores")
        _set_scale(bottom, all_y)
        ticks = sorted(x_of.items(), key=lambda kv: kv[1])
        bottom.set_xticks([x for _, x in ticks])
        bottom.set_xticklabels([str(_index(b)) for b, _ in ticks], fontsize=8)
        bottom.set_xlabel("block")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
