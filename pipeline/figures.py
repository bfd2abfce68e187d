"""Figures of localization scores: intervals per hypothesis, their spread over examples, node
heatmaps, strongest edges, edges by layer, faithfulness curves and a circuit's drawing.

Input is a scores table (hypothesis, proportion_explained, pe_boot_low/high or pe_low/high, ...)
joined with the `hypotheses` view's facts: the node and edge figures read a row's `kind`
("remove_node", "remove_edge") and its target's `layer`, `head`, `sender`, `receiver` and
`channel`, never its name. Node positions on a layout come from `pathpatch.model.names`.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pathpatch.model.graph import NodeKind  # noqa: E402
from pathpatch.model.names import node_parts  # noqa: E402


def _rows(scores) -> list[dict]:
    return scores.to_pylist() if hasattr(scores, "to_pylist") else list(scores)


def _effect(row: dict) -> float | None:
    """Share of the total effect the hypothesis leaves unexplained (AUE / ATE)."""
    pe = row.get("proportion_explained")
    return None if pe is None or (isinstance(pe, float) and math.isnan(pe)) else 1.0 - pe


SHOWN = 40
"""Hypotheses in the interval and spread panels: those that explain least."""


def least_explained(scores, max_rows: int = SHOWN) -> list[dict]:
    """The `max_rows` hypotheses with a defined score that explain least, best of them first:
    with many hypotheses, those matter most (the interval and spread panels show these)."""
    rows = [r for r in _rows(scores) if r.get("proportion_explained") is not None]
    rows.sort(key=lambda r: r["proportion_explained"])
    return rows[:max_rows][::-1]


def intervals_axes(ax, scores, max_rows: int = SHOWN) -> None:
    """Proportion explained per hypothesis with its interval, best first."""
    total = sum(r.get("proportion_explained") is not None for r in _rows(scores))
    rows = least_explained(scores, max_rows)
    y = list(range(len(rows)))[::-1]
    pe = [r["proportion_explained"] for r in rows]
    def bound(r: dict, side: str, p: float) -> float:  # bootstrap (summarize) or delta (SQL)
        v = r.get(f"pe_boot_{side}", r.get(f"pe_{side}"))
        return p if v is None else v

    low = [bound(r, "low", p) for r, p in zip(rows, pe)]
    high = [bound(r, "high", p) for r, p in zip(rows, pe)]
    lo = [p - l for p, l in zip(pe, low)]
    hi = [h - p for p, h in zip(pe, high)]
    ax.errorbar(pe, y, xerr=[lo, hi], fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3, ms=4)
    ax.axvline(0, color="black", lw=0.6)
    ax.axvline(1, color="black", lw=0.6, ls=":")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['hypothesis']} (n={r.get('n', '?')})" for r in rows], fontsize=7)
    ax.set_xlabel("proportion explained  (1 - AUE/ATE), 95% interval")
    ax.set_title("hypotheses" if total <= max_rows else f"the {max_rows} explaining least, of {total}")


def spread_axes(ax, scores, per_example: dict[str, list[float]], max_rows: int = SHOWN) -> None:
    """Per-example proportion explained (1 - UE/TE of each pair) for the hypotheses of
    `intervals_axes`, in its order: a mean can hide pairs the hypothesis explains and pairs
    it does not."""
    rows = [r for r in least_explained(scores, max_rows) if per_example.get(r["hypothesis"])]
    if not rows:
        ax.set_axis_off()
        return
    data = [per_example[r["hypothesis"]] for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.boxplot(data, positions=y, vert=False, widths=0.6, whis=(5, 95), showfliers=False,
               medianprops=dict(color="tab:orange"))
    ax.scatter([r["proportion_explained"] for r in rows], y, s=12, color="tab:blue", zorder=3,
               label="mean ratio (1 - AUE/ATE)")
    ax.axvline(0, color="black", lw=0.6)
    ax.axvline(1, color="black", lw=0.6, ls=":")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['hypothesis']} ({len(per_example[r['hypothesis']])} pairs)" for r in rows],
                       fontsize=7)
    ax.set_xlabel("per-example 1 - UE/TE (box: quartiles, whiskers: 5-95%)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("spread over examples")


def node_matrix(scores) -> tuple[list[list[float | None]], bool] | None:
    """[layer][head (+ MLP column)] of AUE/ATE for node-removal hypotheses (rows of kind
    "remove_node", with their target's layer and head), or None."""
    found = {}
    for r in _rows(scores):
        if r.get("kind") == "remove_node" and r.get("layer") is not None:
            key = (r["layer"], "mlp" if r.get("head") is None else r["head"])
            found[key] = _effect(r)
    if not found:
        return None
    layers = 1 + max(k[0] for k in found)
    heads = 1 + max((k[1] for k in found if k[1] != "mlp"), default=-1)
    has_mlp = any(k[1] == "mlp" for k in found)
    matrix = [[found.get((l, h)) for h in range(heads)] + ([found.get((l, "mlp"))] if has_mlp else [])
              for l in range(layers)]
    return matrix, has_mlp


def heatmap_axes(ax, scores) -> bool:
    """Layers x heads heatmap of the effect each node's removal leaves unexplained."""
    found = node_matrix(scores)
    if found is None:
        return False
    matrix, has_mlp = found
    values = [[math.nan if v is None else v for v in row] for row in matrix]
    im = ax.imshow(values, cmap="magma_r", aspect="auto", vmin=0, vmax=max(1e-9, max(
        (v for row in values for v in row if not math.isnan(v)), default=1)))
    n_cols = len(values[0])
    labels = [str(h) for h in range(n_cols - (1 if has_mlp else 0))] + (["MLP"] if has_mlp else [])
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(labels)
    ax.set_yticks(range(len(values)))
    ax.set_ylabel("layer")
    ax.set_xlabel("head")
    for l, row in enumerate(values):
        for h, v in enumerate(row):
            if not math.isnan(v):
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 * im.get_clim()[1] else "black")
    ax.figure.colorbar(im, ax=ax, label="AUE / ATE when removed")
    ax.set_title("node removed: effect left unexplained")
    return True


def _node_xy(name: str, n_layers: int) -> tuple[float, float]:
    kind, layer, head = node_parts(name)
    if kind is NodeKind.INPUT:
        return -1.0, 0.0
    if kind is NodeKind.OUTPUT:
        return float(n_layers), 0.0
    if kind is NodeKind.MLP:
        return layer + 0.5, 0.0
    return float(layer), head - 1.5


_CHANNEL_COLORS = {"q": "tab:green", "k": "tab:orange", "v": "tab:purple", None: "tab:blue"}


def _draw_edges(ax, edges: list[tuple[float, str, str, str | None]]) -> None:
    """(weight, sender, receiver, channel) arrows on the model's layout (nodes by layer), width
    by |weight|, colour by the receiver's channel."""
    names = {n for _, s, t, _ in edges for n in (s, t)}
    n_layers = 1 + max((layer for layer in map(_layer_of, names) if layer is not None), default=0)
    top = max((abs(e[0]) for e in edges), default=1.0) or 1.0
    for weight, s, t, ch in reversed(edges):
        (x0, y0), (x1, y1) = _node_xy(s, n_layers), _node_xy(t, n_layers)
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="-|>", lw=0.5 + 4 * abs(weight) / top, color=_CHANNEL_COLORS[ch],
            alpha=0.8, connectionstyle="arc3,rad=0.15"))
    for n in names:
        x, y = _node_xy(n, n_layers)
        ax.scatter([x], [y], s=520, color="white", edgecolor="black", zorder=3)
        ax.text(x, y, n, ha="center", va="center", fontsize=8, zorder=4)
    for ch, c in _CHANNEL_COLORS.items():
        ax.plot([], [], color=c, label=f".{ch}" if ch else "resid")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("layer")
    ax.set_yticks([])


def edges_axes(ax, scores, top_k: int = 20) -> bool:
    """The edges whose removal leaves the most effect unexplained, drawn on the model's layout."""
    edges = [(_effect(r), r["sender"], r["receiver"], _channel(r["channel"]))
             for r in _edge_removals(scores) if _effect(r) is not None]
    if not edges:
        return False
    edges.sort(reverse=True)
    strongest = edges[:top_k]
    _draw_edges(ax, strongest)
    ax.set_title(f"strongest {len(strongest)} edges (width: AUE/ATE when removed)")
    return True


def circuit_axes(ax, edges: list[tuple[float, str, str, str | None]], title: str) -> None:
    """A circuit's edges (weight, sender, receiver, channel) on the model's layout, width by the
    ranking's |score| (all equal where the ranking is not at hand)."""
    _draw_edges(ax, sorted(edges, key=lambda e: -abs(e[0])))
    ax.set_title(title, fontsize=9)


def curve_axes(ax, points: list[dict], areas: list[dict]) -> None:
    """Faithfulness against the fraction k of edges kept, one line per (ranking, ordering), with
    its paired-bootstrap band; CPR (signed) and CMD (absolute) in the legend."""
    area = {(a["ranking"], "signed"): f"CPR {a['cpr']:.3f}" if a["cpr"] is not None else "CPR -"
            for a in areas}
    area |= {(a["ranking"], "absolute"): f"CMD {a['cmd']:.3f}" if a["cmd"] is not None else "CMD -"
             for a in areas}
    lines: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        if p["faithfulness"] is not None:
            lines.setdefault((p["ranking"], p["ordering"]), []).append(p)
    for (ranking, ordering), pts in sorted(lines.items()):
        pts.sort(key=lambda p: p["k"])
        ks = [p["k"] for p in pts]
        line, = ax.plot(ks, [p["faithfulness"] for p in pts], marker="o", ms=3,
                        label=f"{ranking}, {ordering} ({area.get((ranking, ordering), '')})")
        ax.fill_between(ks, [p["faithfulness_low"] for p in pts],
                        [p["faithfulness_high"] for p in pts], color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges kept (k)")
    ax.set_ylabel("faithfulness f(C), 95% bootstrap band")
    ax.legend(fontsize=7)
    ax.set_title("faithfulness curves (MIB)")


def _layer_of(name: str) -> int | None:
    """Layer index of a node name; None for `in` (before layer 0) and `out` (after the last)."""
    return node_parts(name)[1]


def _edge_removals(scores) -> list[dict]:
    """The rows of single-edge removals (kind "remove_edge": sender, receiver, channel)."""
    return [r for r in _rows(scores) if r.get("kind") == "remove_edge"]


def _channel(channel: str | None) -> str | None:
    """A receiver's channel as the drawing colours it: q, k, v, or None (the residual input)."""
    return None if channel in (None, "resid") else channel


def edge_layers_axes(ax, scores) -> bool:
    """Senders' layer x receivers' layer heat map of the largest effect a single edge's removal
    leaves unexplained: 32,491 edges of GPT-2 small in one readable panel."""
    cells: dict[tuple[str, str], float] = {}
    removals = _edge_removals(scores)
    for r in removals:
        effect = _effect(r)
        if effect is None:
            continue
        s, t = _layer_of(r["sender"]), _layer_of(r["receiver"])
        key = ("in" if s is None else str(s), "out" if t is None else str(t))
        cells[key] = max(cells.get(key, float("-inf")), effect)
    if not cells:
        return False
    layers = sorted({int(k) for pair in cells for k in pair if k not in ("in", "out")})
    senders = ["in"] + [str(l) for l in layers]
    receivers = [str(l) for l in layers] + ["out"]
    values = [[cells.get((s, t), math.nan) for t in receivers] for s in senders]
    im = ax.imshow(values, cmap="magma_r", aspect="auto", vmin=0, vmax=max(1e-9, max(cells.values())))
    ax.set_xticks(range(len(receivers)))
    ax.set_xticklabels(receivers, fontsize=7)
    ax.set_yticks(range(len(senders)))
    ax.set_yticklabels(senders, fontsize=7)
    ax.set_xlabel("receiver's layer")
    ax.set_ylabel("sender's layer")
    ax.figure.colorbar(im, ax=ax, label="largest AUE / ATE of one edge removed")
    ax.set_title(f"edges by layer ({len(removals)} removed one at a time)")
    return True


def report_figure(scores, title: str = "", per_example: dict[str, list[float]] | None = None,
                  curve: tuple[list[dict], list[dict]] | None = None,
                  circuit: tuple[list[tuple[float, str, str, str | None]], str] | None = None
                  ) -> Figure:
    """All panels that apply to these scores (rows with their facts: see the module's
    docstring), in one figure (`per_example`: hypothesis ->
    each pair's 1 - UE/TE, for the spread panel; `curve`: the `faithfulness` and
    `curve_scores` rows; `circuit`: one circuit's weighted edges and its title)."""
    rows = _rows(scores)
    panels = [intervals_axes]
    if per_example:
        panels.append(lambda ax, rows: spread_axes(ax, rows, per_example))
    if curve is not None and curve[0]:
        panels.append(lambda ax, rows: curve_axes(ax, *curve))
    if circuit is not None and circuit[0]:
        panels.append(lambda ax, rows: circuit_axes(ax, *circuit))
    if node_matrix(rows) is not None:
        panels.append(heatmap_axes)
    if _edge_removals(rows):
        panels += [edges_axes, edge_layers_axes]
    height = max(4.0, 0.22 * min(SHOWN, len(rows)) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), height), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        panel(ax, rows)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
