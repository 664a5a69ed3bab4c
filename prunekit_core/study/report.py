"""``prunekit report``: a Markdown table, the Pareto front and a PNG plot from a sweep's results store.

The Pareto front is the set of rows no other row beats on both axes: fewer (or equal) bits per parameter
*and* lower (or equal) perplexity, strictly better on one. Rows with an infinite or NaN perplexity are
listed but never on the front.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path, write_text
from .sweep import read_results

__all__ = ["pareto_front", "plot_results", "render_report", "write_report"]

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d")


def _finite(row: dict[str, Any]) -> bool:
    p = row.get("perplexity")
    return p is not None and math.isfinite(p)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows on the (bits per parameter, perplexity) front, sorted by bits."""
    pts = [r for r in rows if _finite(r)]
    front = []
    for r in pts:
        dominated = any(
            o["bits_per_param"] <= r["bits_per_param"]
            and o["perplexity"] <= r["perplexity"]
            and (o["bits_per_param"] < r["bits_per_param"] or o["perplexity"] < r["perplexity"])
            for o in pts
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["bits_per_param"])


def _label(row: dict[str, Any]) -> str:
    pruning = "unpruned" if row["method"] == "none" else f"{row['method']} {row['ratio']:.0%}"
    return f"{pruning} + {row['format']}"


def plot_results(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """PNG: bits per parameter (x) against perplexity (y, log); one marker per format, one color per
    pruning method and ratio; the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _finite(r)]
    formats = sorted({r["format"] for r in pts}, key=lambda f: (f != "none", f))
    prunings = sorted({(r["method"], r["ratio"]) for r in pts}, key=lambda m: (m[1], m[0]))
    cmap = plt.get_cmap("viridis", max(len(prunings), 2))
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (method, ratio) in enumerate(prunings):
        for j, f in enumerate(formats):
            sel = [r for r in pts if r["method"] == method and r["ratio"] == ratio and r["format"] == f]
            if not sel:
                continue
            ax.scatter(
                [r["bits_per_param"] for r in sel],
                [r["perplexity"] for r in sel],
                marker=MARKERS[j % len(MARKERS)],
                color=cmap(i),
                s=60,
                edgecolors="black",
                linewidths=0.5,
            )
    front = pareto_front(rows)
    ax.plot(
        [r["bits_per_param"] for r in front],
        [r["perplexity"] for r in front],
        color="#d62728",
        lw=1.5,
        ls="--",
        label="Pareto front",
    )
    # two legends: marker = format, color = pruning
    from matplotlib.lines import Line2D

    fmt_handles = [
        Line2D([], [], marker=MARKERS[j % len(MARKERS)], color="gray", ls="", label=f)
        for j, f in enumerate(formats)
    ]
    prune_handles = [
        Line2D([], [], marker="o", color=cmap(i), ls="", label="unpruned" if m == "none" else f"{m} {r:.0%}")
        for i, (m, r) in enumerate(prunings)
    ]
    leg1 = ax.legend(handles=fmt_handles, title="format", loc="upper right", fontsize=8)
    ax.add_artist(leg1)
    ax.legend(handles=prune_handles + [ax.lines[0]], title="pruning", loc="upper center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the unpruned model (weights + scales + zero points)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or "pruning x quantization")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


def render_report(rows: list[dict[str, Any]], *, plot_name: str | None = None, title: str = "") -> str:
    """The Markdown report: every row, then the front."""
    front = {r["cell"] for r in pareto_front(rows)}
    base = next((r for r in rows if r["method"] == "none" and r["format"] == "none"), None)
    lines = [f"# {title or 'Sweep report'}", ""]
    if rows:
        r0 = rows[0]
        lines += [
            f"{len(rows)} cells; perplexity on {r0['eval_tokens']} predicted tokens per cell; bits per "
            f"parameter = total model bits / {r0['reference_params']:,} (the unpruned model's parameters), "
            "so removed structure and quantization both lower it. Unquantized tensors count at "
            f"{r0['size']['base_bits']} bits. * marks the Pareto front.",
            "",
        ]
    if plot_name:
        lines += [f"![bits per parameter vs perplexity]({plot_name})", ""]
    lines += [
        "| | pruning | removed | format | bits/param | blocks bits/param | MB | perplexity | vs unpruned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["bits_per_param"]):
        ppl = r["perplexity"]
        rel = f"{ppl / base['perplexity']:.3f}x" if base and _finite(r) and _finite(base) else "-"
        size = r["size"]
        blocks = size["bits"]["blocks"] / max(size["params"]["blocks"], 1)
        pruning = "none" if r["method"] == "none" else f"{r['method']} {r['ratio']:.0%}"
        lines.append(
            f"| {'*' if r['cell'] in front else ''} | {pruning} | {len(r['removed'])} units | {r['format']} | "
            f"{r['bits_per_param']:.3f} | {blocks:.3f} | {r['total_bits'] / 8e6:.1f} | "
            f"{ppl:.2f} | {rel} |"
            if _finite(r)
            else f"| | {pruning} | {len(r['removed'])} units | {r['format']} | {r['bits_per_param']:.3f} | "
            f"{blocks:.3f} | {r['total_bits'] / 8e6:.1f} | inf/nan | - |"
        )
    lines += ["", "## Pareto front", ""]
    for r in pareto_front(rows):
        lines.append(f"- {r['bits_per_param']:.3f} bits/param: {_label(r)}, perplexity {r['perplexity']:.2f}")
    return "\n".join(lines) + "\n"


def write_report(results: str | Path, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write ``report.md`` and ``pareto.png`` for a results store into ``out_dir``; returns their paths."""
    rows = read_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_results(rows, out / "pareto.png", title=title)
    md = out / "report.md"
    write_text(md, render_report(rows, plot_name=png.name, title=title))
    return {"report": md, "plot": png}
