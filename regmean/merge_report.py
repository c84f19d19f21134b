"""How much of each expert a merge keeps, layer by layer: the output error figures, their summary
and their picture. For a linear layer with merged weight W, expert weights Wᵢ and expert i's
full gram Gᵢ (the second moment of the inputs it saw, α = 1):

    eᵢ(W) = tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ) / tr(Wᵢ Gᵢ Wᵢᵀ)

the relative mean squared error of the layer's output on expert i's own calibration inputs, for
the merged weight and for the weighted average of the same experts. The quadratic forms come
from solver.output_error_terms on a systematic sample of output rows (every `sample_every`-th
row, at least MIN_ROWS per layer; all rows with sample_every 1); each figure is a ratio of two
sums over the same rows and carries the relative standard error of that ratio estimate.

    rows = sample_rows(out_features, sample_every)         # which rows of a layer to use
    figures = layer_figures(terms, out_features)            # terms: [3, N, rows] of the sampled rows
    summary = error_summary(layers, names)                  # per expert: median and worst layer
    print("\\n".join(summary_lines(summary)))
    draw_picture(layers, names, "merge_report.png", title)  # per module kind, over depth

merge_model.py computes them as it merges (merge_report.json, merge_report.png, the model card);
judge_merge.py computes them for any merged folder from the experts and their gram files.
"""

import math
import re
from pathlib import Path

import torch
from torch import Tensor

SAMPLE_EVERY = 256  # the figures are taken on every 256th output row of a layer (1: all rows)
MIN_ROWS = 16  # ... and on at least this many rows per layer (all of them if it has fewer)

# Module kinds of the picture: (title, last parts of the module names it holds)
KINDS = [
    ("attention inputs (q, k, v)", ("q_proj", "k_proj", "v_proj", "qkv_proj")),
    ("o_proj", ("o_proj",)),
    ("MLP inputs (gate, up)", ("gate_proj", "up_proj", "gate_up_proj")),
    ("down_proj", ("down_proj",)),
    ("lm_head", ("lm_head",)),
]
# modules that read one input, told apart by line style and marker (a legend's short handle hides the style alone)
LINESTYLES = {"q_proj": "-", "k_proj": "--", "v_proj": ":", "gate_proj": "-", "up_proj": "--"}
MARKERS = {"q_proj": "o", "k_proj": "x", "v_proj": "^", "gate_proj": "o", "up_proj": "x"}


def sample_step(num_rows: int, sample_every: int = SAMPLE_EVERY) -> int:
    """Rows apart of the sampled rows of a layer: sample_every, fewer where that leaves under MIN_ROWS."""
    return max(1, min(sample_every, num_rows // MIN_ROWS))


def sample_rows(num_rows: int, sample_every: int = SAMPLE_EVERY) -> Tensor:
    """Indices of the output rows on which a layer's figures are taken: evenly spaced, every
    sample_every-th (fewer apart where that leaves under MIN_ROWS rows), the first step // 2."""
    step = sample_step(num_rows, sample_every)
    return torch.arange(step // 2, num_rows, step)


def block_slice(rows: tuple[int, int], step: int) -> slice:
    """The sampled rows (those of sample_rows) inside the block of rows (start, stop), as a slice
    of the block: a view, no copy and no index tensor."""
    start, stop = rows
    first = step // 2 + max(0, -(-(start - step // 2) // step)) * step  # first sampled row >= start
    return slice(first - start, stop - start, step)


def layer_figures(terms: Tensor, num_rows: int) -> dict:
    """Figures of one layer from solver.output_error_terms of its sampled rows ([3, N, s]) and
    its number of output rows. merged, average: eᵢ per expert; energy: tr(Wᵢ Gᵢ Wᵢᵀ) (scaled to
    all rows); merged_se, average_se: relative standard error of each eᵢ from the sampling (0 when
    every row was used), by the usual ratio-estimator formula with the finite-population factor."""
    terms = terms.double()
    s = terms.shape[-1]
    x = terms[2]  # [N, s]: the experts' own output energy per row
    energy = x.sum(-1) * num_rows / s
    out = dict(rows=s, of=num_rows, energy=energy.tolist())
    for k, kind in enumerate(("merged", "average")):
        y = terms[k]
        ratio = y.sum(-1) / x.sum(-1)
        if s > 1:
            spread = ((y - ratio[:, None] * x) ** 2).sum(-1) / (s - 1)
            var = max(0.0, 1 - s / num_rows) * spread / (s * x.mean(-1) ** 2)
            se = var.sqrt() / ratio.abs()
        else:
            se = torch.full_like(ratio, float("inf"))
        out[kind] = [r if math.isfinite(r) else None for r in ratio.tolist()]
        out[f"{kind}_se"] = [e if math.isfinite(e) else None for e in se.tolist()]
    return out


def module_kind(tensor: str) -> str:
    """The picture's kind of a weight by its module's last name part ('other' if none fits)."""
    part = tensor.removesuffix(".weight").rsplit(".", 1)[-1]
    return next((title for title, parts in KINDS if part in parts), "other")


def depth(tensor: str) -> int | None:
    """The decoder layer index in a weight's name (model.layers.7.mlp.down_proj.weight -> 7)."""
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", tensor)
    return int(m.group(1)) if m else None


def short_name(tensor: str) -> str:
    """model.layers.7.mlp.down_proj.weight -> layers.7.down_proj"""
    d, part = depth(tensor), tensor.removesuffix(".weight").rsplit(".", 1)[-1]
    return part if d is None else f"layers.{d}.{part}"


def error_summary(layers: list[dict], names: list[str]) -> list[dict]:
    """Per expert, over the layers that have figures (report rows with an `output_error`): the
    median eᵢ of the merge and of the average, the merge's worst layer (and the average on it),
    the average's worst layer, the shares of layers where the merge is below the average and where
    it equals it, and the largest relative sampling error of any figure (its layer, and whether
    it is the merge's figure or the average's)."""
    rows = [r for r in layers if r.get("output_error")]
    out = []
    for i, name in enumerate(names):
        pairs = [
            (r["tensor"], r["output_error"]["merged"][i], r["output_error"]["average"][i])
            for r in rows
            if r["output_error"]["merged"][i] is not None and r["output_error"]["average"][i] is not None
        ]
        if not pairs:
            continue
        merged = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        average = torch.tensor([p[2] for p in pairs], dtype=torch.float64)
        worst, worst_avg = int(merged.argmax()), int(average.argmax())
        ses = [
            (e, r["tensor"], key)
            for r in rows
            for key in ("merged", "average")
            for e in [r["output_error"][f"{key}_se"][i]]
            if e is not None
        ]
        se, se_layer, se_figure = max(ses, default=(0.0, None, None))
        equal = (merged - average).abs() <= 1e-6 * average.abs()  # the merge is the average there (an avg merge)
        out.append(
            dict(
                expert=name,
                layers=len(pairs),
                merged_median=merged.median().item(),
                average_median=average.median().item(),
                merged_worst=merged[worst].item(),
                merged_worst_layer=pairs[worst][0],
                average_on_that_layer=average[worst].item(),
                average_worst=average[worst_avg].item(),
                average_worst_layer=pairs[worst_avg][0],
                merged_below_average=((merged < average) & ~equal).double().mean().item(),
                merged_equal_average=equal.double().mean().item(),
                max_sampling_se=se,
                max_sampling_se_layer=se_layer,
                max_sampling_se_figure=se_figure,
            )
        )
    return out


def summary_lines(summary: list[dict], method: str = "merged", every: str = "--error-sample-every") -> list[str]:
    """The summary in a few lines, for the log and the model card; `every` is the option that sets the
    row sampling (merge_model.py's --error-sample-every, judge_merge.py's --sample-every)."""
    if not summary:
        return []
    lines = [
        "Output error per linear layer, relative to each expert's own output on its own calibration inputs "
        f"(tr((W − Wᵢ)Gᵢ(W − Wᵢ)ᵀ) / tr(WᵢGᵢWᵢᵀ); lower keeps more of the expert), {method} vs the weighted average:"
    ]
    for s in summary:
        worst, avg_worst = short_name(s["merged_worst_layer"]), short_name(s["average_worst_layer"])
        equal = s.get("merged_equal_average", 0.0)
        if equal == 1.0:
            lines.append(
                f"- {s['expert']}: median {s['merged_median']:.3g}, worst {s['merged_worst']:.3g} at {worst}; "
                f"the same figures as the weighted average on all {s['layers']} layers: this merge is the average "
                "(as an avg merge is)"
            )
            continue
        same = f", equal to it on {100 * equal:.0f}%" if equal > 0 else ""
        lines.append(
            f"- {s['expert']}: median {s['merged_median']:.3g} (average {s['average_median']:.3g}); "
            f"worst {s['merged_worst']:.3g} at {worst} (average {s['average_on_that_layer']:.3g} there; "
            f"its worst {s['average_worst']:.3g} at {avg_worst}); "
            f"below the average on {100 * s['merged_below_average']:.0f}%{same} of {s['layers']} layers"
        )
    top = max(summary, key=lambda s: s["max_sampling_se"])
    se = top["max_sampling_se"]
    if se > 0:
        figure = method if top.get("max_sampling_se_figure") == "merged" else "average's"
        where = f"{short_name(top['max_sampling_se_layer'])} ({figure} figure, {top['expert']})"
        if se <= 0.1:
            verdict = f"small: every figure is good to about ±{se:.0%}"
        else:
            verdict = (
                f"that figure is only good to about ±{se:.0%}, the medians over many layers are steadier; "
                f"{every} 1 takes every row (exact figures, slower)"
            )
        lines.append(
            f"(figures from sampled output rows; largest relative sampling error {se:.2g}, at {where}: {verdict})"
        )
    return lines


def draw_picture(layers: list[dict], names: list[str], path: str | Path, title: str, method: str = "merged") -> Path:
    """merge_report.png: one row of panels per module kind, the figure over depth per expert
    (colour; q/k/v and gate/up by line style), the merge on the left and the weighted average on
    the right on the same log scale; lm_head (one layer) as points per expert."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state (Agg canvas)
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in layers if r.get("output_error")]
    kinds = [title_ for title_, _ in KINDS if any(module_kind(r["tensor"]) == title_ for r in rows)]
    kinds += ["other"] if any(module_kind(r["tensor"]) == "other" for r in rows) else []
    ratios = [0.6 if kind == "lm_head" else 1.0 for kind in kinds]
    height = 2.6 * sum(ratios) + 1.0
    fig = Figure(figsize=(11, height))  # margins set by hand: a layout engine would double the drawing time
    # the legends go right of the panels (inside, they cover lines): 2.2 inches kept for them
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.5 / height, top=1 - 0.85 / height, wspace=0.06, hspace=0.5)
    axes = fig.subplots(len(kinds), 2, sharey="row", squeeze=False, gridspec_kw=dict(height_ratios=ratios))
    colors = [f"C{i}" for i in range(len(names))]
    for row, kind in enumerate(kinds):
        members = [r for r in rows if module_kind(r["tensor"]) == kind]
        for col, key in enumerate(("merged", "average")):
            ax = axes[row][col]
            positive = False
            if kind == "lm_head" or all(depth(r["tensor"]) is None for r in members):
                for i, name in enumerate(names):
                    values = [r["output_error"][key][i] for r in members]
                    ax.plot([name] * len(values), values, "o", color=colors[i], markersize=8)
                    positive |= any(v is not None and v > 0 for v in values)
                ax.margins(x=0.4)  # the experts' names under the points stay apart
            else:
                parts = {r["tensor"].removesuffix(".weight").rsplit(".", 1)[-1] for r in members}
                parts = sorted(parts, key=lambda p: (list(MARKERS).index(p) if p in MARKERS else len(MARKERS), p))
                for i, name in enumerate(names):
                    for part in parts:
                        pts = sorted(
                            (depth(r["tensor"]), r["output_error"][key][i])
                            for r in members
                            if r["tensor"].removesuffix(".weight").endswith("." + part)
                            and depth(r["tensor"]) is not None
                            and r["output_error"][key][i] is not None
                        )
                        if not pts:
                            continue
                        label = name if len(parts) == 1 else f"{name} {part}"
                        style = dict(linestyle=LINESTYLES.get(part, "-"), marker=MARKERS.get(part, "."), markersize=4)
                        ax.plot(*zip(*pts), color=colors[i], label=label, **style)
                        positive |= any(v > 0 for _, v in pts)
                ax.set_xlabel("layer")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if positive:
                ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{kind}: {method if key == 'merged' else 'weighted average'}", fontsize=10)
            if col == 0:
                ax.set_ylabel("relative output error")
        if kind != "lm_head" and axes[row][1].get_legend_handles_labels()[0]:
            axes[row][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1), borderaxespad=0, handlelength=3)
    fig.suptitle(
        f"{title}\nrelative output error eᵢ = tr((W−Wᵢ)Gᵢ(W−Wᵢ)ᵀ) / tr(WᵢGᵢWᵢᵀ) on each expert's own inputs "
        "(lower: more of expert i kept)",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
