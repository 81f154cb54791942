"""The plots of ``lightning-peft compare``, drawn with matplotlib's Agg canvas (no display, no pyplot).

Each plot puts the validation metric (the best value of the metric the recipes' ``ModelCheckpoint``
monitors) against one cost: the trainable share of the parameters, the peak memory, the training
step time; a fourth shows each recipe's per-seed spread. Every recipe is one colour and marker,
named in a legend and next to its point, so a plot reads without the table.

The functions take the rows of ``results.csv`` and the per-recipe summaries of
:func:`lightning_peft.compare.aggregate` as plain dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["PLOTS", "label", "metric_label", "write_plots"]

PLOTS = {
    "trainable_pct": "val_vs_trainable_share.png",
    "peak_mem_mib": "val_vs_peak_memory.png",
    "step_time_ms": "val_vs_step_time.png",
    "spread": "val_spread_per_seed.png",
}
"""File name of each plot, by the column on its x axis (``spread``: the per-seed plot)."""

_X_AXES = {
    "trainable_pct": ("trainable parameters (% of the model, log scale)", "trainable share"),
    "peak_mem_mib": ("peak memory of the run (MiB; CPU: resident, CUDA: allocated)", "peak memory"),
    "step_time_ms": ("training step time (ms, median after warm-up)", "step time"),
}
_MARKERS = "osD^vP*Xhp<>"


def label(summary: dict[str, Any]) -> str:
    """A recipe's name in the plots: ``"bitfit (partial)"``, or the recipe alone when it is the method."""
    recipe, method = summary["recipe"], summary.get("method") or ""
    return recipe if not method or method == recipe else f"{recipe} ({method})"


def metric_label(summaries: Sequence[dict[str, Any]]) -> str:
    """The y-axis label: ``"best val_acc (fraction correct, higher is better)"`` and the like."""
    names = sorted({s["val_metric"] for s in summaries if s.get("val_metric")})
    if not names:
        return "best validation metric"
    text = "best " + " / ".join(names)
    if all(n.endswith("acc") for n in names):
        return text + " (fraction correct, higher is better)"
    if all(n.endswith("loss") for n in names):
        return text + " (lower is better)"
    return text


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _style(i: int, cmap: Any) -> dict[str, Any]:
    return {"color": cmap(i % 10), "marker": _MARKERS[i % len(_MARKERS)]}


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no successful run measured {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _cmap() -> Any:
    return colormaps["tab10"]


def scatter_plot(
    rows: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]], x: str, path: Path
) -> Path:
    """The metric against the cost ``x``: each seed faint, each recipe's mean with ± std bars, labelled.

    Args:
        rows: The runs (``results.csv`` rows).
        summaries: One per recipe, from :func:`lightning_peft.compare.aggregate`.
        x: ``"trainable_pct"``, ``"peak_mem_mib"`` or ``"step_time_ms"``.
        path: PNG file to write.
    """
    xlabel, what = _X_AXES[x]
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    cmap = _cmap()
    drawn = 0
    for i, s in enumerate(summaries):
        mine = [r for r in rows if r["recipe"] == s["recipe"] and not r.get("error")]
        points = [
            (r[x], r["val_value"]) for r in mine if r.get(x) is not None and r.get("val_value") is not None
        ]
        if not points:
            continue
        style = _style(i, cmap)
        ax.scatter(*zip(*points), alpha=0.35, s=22, **style)
        mean_x = s[x] if x == "trainable_pct" else s[x][0]
        std_x = None if x == "trainable_pct" else s[x][1]
        mean_y, std_y = s["val_value"]
        if mean_x is None or mean_y is None:
            continue
        ax.errorbar(
            mean_x,
            mean_y,
            xerr=std_x,
            yerr=std_y,
            markersize=9,
            capsize=3,
            linestyle="none",
            label=label(s),
            markeredgecolor="black",
            **style,
        )
        ax.annotate(
            label(s),
            (mean_x, mean_y),
            xytext=(7, 6 if i % 2 == 0 else -13),
            textcoords="offset points",
            fontsize=8,
        )
        drawn += 1
    if drawn == 0:
        _empty(ax, what)
    else:
        if x == "trainable_pct":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(summaries))
        ax.margins(x=0.12, y=0.08)  # room for the names next to the points
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax.set_title(
        f"Validation metric vs {what}\n(large: mean ± std over seeds; faint: single seeds)", fontsize=11
    )
    return _save(fig, path)


def spread_plot(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each recipe's per-seed metric values: a box plot with every seed drawn on top."""
    fig = Figure(figsize=(max(6.0, 1.1 * len(summaries) + 2), 5.5))
    ax = fig.add_subplot()
    cmap = _cmap()
    shown = [(i, s) for i, s in enumerate(summaries) if s["values"]]
    if not shown:
        _empty(ax, "a validation metric")
    else:
        ax.boxplot([s["values"] for _, s in shown], positions=range(len(shown)), widths=0.5, showfliers=False)
        for pos, (i, s) in enumerate(shown):
            n = len(s["values"])
            offsets = [0.0] if n == 1 else [-0.15 + 0.3 * k / (n - 1) for k in range(n)]
            ax.scatter([pos + o for o in offsets], s["values"], zorder=3, s=30, **_style(i, cmap))
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(
            [f"{label(s)}\n{_seeds(len(s['values']))}" for _, s in shown], fontsize=8, rotation=20
        )
        ax.set_xlabel("recipe (method)")
        ax.set_ylabel(metric_label(summaries))
        ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("Validation metric per seed\n(box: quartiles and median; points: single seeds)", fontsize=11)
    return _save(fig, path)


def write_plots(
    rows: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]], out_dir: Path
) -> list[Path]:
    """Write every plot of :data:`PLOTS` to ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = [scatter_plot(rows, summaries, x, out_dir / PLOTS[x]) for x in _X_AXES]
    paths.append(spread_plot(summaries, out_dir / PLOTS["spread"]))
    return paths
