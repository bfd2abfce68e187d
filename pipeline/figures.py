"""Figures of localization scores: intervals per hypothesis, their spread over examples, node
heatmaps, strongest edges, edges by layer, faithfulness curves and a circuit's drawing.

Input is a scores table (hypothesis, proportion_explained, pe_boot_low/high or pe_low/high, ...)
joined with the `hypotheses` view's facts: the node and edge figures read a row's `kind`
("remove_node", "remove_edge") and its target's `layer`, `head`, `sender`, `receiver` and
`channel`, never its name. Node positions on a layout come from `pathpatch.model.names`.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

# no pyplot: a figure made directly saves itself through Agg and needs no closing (timed side
# by side, leaving pyplot out did not move `pathpatch report`'s start beyond the spread)
matplotlib.use("Agg")  # files only, never a window
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
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("proportion explained (1 - AUE/ATE)\nwith its 95% interval over the n pairs")
    ax.set_title("hypotheses" if total <= max_rows else f"the {max_rows} explaining least, of {total}")


def spread_axes(ax, scores, per_example: dict[str, list[float]], max_rows: int = SHOWN) -> None:
    """Per-example proportion explained (1 - UE/TE of each pair) for the hypotheses of
    `intervals_axes`, in its order and on its rows: a mean can hide pairs the hypothesis
    explains and pairs it does not. Each row says how many of the hypothesis's n pairs it
    shows (those with a defined ratio); the meaning of the marks is in the axis label, so no
    legend covers a row."""
    rows = least_explained(scores, max_rows)
    if not any(per_example.get(r["hypothesis"]) for r in rows):
        ax.set_axis_off()
        return
    y = list(range(len(rows)))[::-1]
    drawn = [(r, yy) for r, yy in zip(rows, y, strict=True) if per_example.get(r["hypothesis"])]
    ax.boxplot([per_example[r["hypothesis"]] for r, _ in drawn], positions=[yy for _, yy in drawn],
               vert=False, widths=0.6, whis=(5, 95), showfliers=False,
               medianprops=dict(color="tab:orange"))
    ax.scatter([r["proportion_explained"] for r in rows], y, s=12, color="tab:blue", zorder=3)
    ax.axvline(0, color="black", lw=0.6)
    ax.axvline(1, color="black", lw=0.6, ls=":")
    ax.set_yticks(y)
    ax.set_yticklabels([pair_count(r, per_example) for r in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("each pair's 1 - UE/TE (box: quartiles, whiskers: 5-95%)\n"
                  "dot: the hypothesis's 1 - AUE/ATE, as on the left")
    ax.set_title("spread over examples")


def pair_count(row: dict, per_example: dict[str, list[float]]) -> str:
    """'510 of 512 pairs': the pairs of a hypothesis the spread panel shows, of its n."""
    shown = len(per_example.get(row["hypothesis"], ()))
    n = row.get("n")
    return f"{shown} pairs" if n is None or n == shown else f"{shown:,} of {n:,} pairs"


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
        ax.plot([], [], color=c, label=f"into .{ch}" if ch else "into resid")
    # beside the drawing, never over a node
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              title="receiver's input", title_fontsize=7)
    ax.set_xticks(range(-1, n_layers + 1))
    ax.set_xticklabels(["in"] + [str(layer) for layer in range(n_layers)] + ["out"])
    ax.set_xlabel("layer")
    ax.set_yticks([])
    ax.margins(0.12)


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
    ax.set_title(textwrap.fill(title, TITLE_WIDTH), fontsize=9)


TITLE_WIDTH = 56
"""Characters per line of a panel's title (longer ones wrap, never run off the figure)."""


def _ranking_colors(points: list[dict]) -> dict[str, str]:
    """One colour per ranking, the same in every curve panel."""
    names = sorted({p["ranking"] for p in points})
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def curve_axes(ax, points: list[dict], areas: list[dict], ordering: str | None = None) -> None:
    """Faithfulness against the fraction k of edges kept, one line per (ranking, ordering), with
    its paired-bootstrap band (`ordering`: only that ordering's lines, one colour per ranking).
    The legend goes beside the axes, outside the curves; CPR and CMD are the table's
    (`curve_text`)."""
    colors = _ranking_colors(points)
    lines: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        if p["faithfulness"] is not None and ordering in (None, p["ordering"]):
            lines.setdefault((p["ranking"], p["ordering"]), []).append(p)
    for (ranking, order), pts in sorted(lines.items()):
        pts.sort(key=lambda p: p["k"])
        ks = [p["k"] for p in pts]
        color = colors[ranking]
        ax.plot(ks, [p["faithfulness"] for p in pts], marker="o", ms=3, color=color,
                ls="-" if order == "signed" or ordering else "--",
                label=ranking if ordering else f"{ranking}, {order}")
        ax.fill_between(ks, [p["faithfulness_low"] for p in pts],
                        [p["faithfulness_high"] for p in pts], color=color, alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges kept (k)")
    ax.set_ylabel("faithfulness f(C), 95% bootstrap band")
    if ordering == "signed":
        ax.set_title("kept by signed score: CPR = area under f (higher is better)", fontsize=10)
    elif ordering == "absolute":
        ax.set_title("kept by |score|: CMD = area of |1 - f| (lower is better)", fontsize=10)
    else:
        ax.set_title("faithfulness curves (MIB)")
    if ordering is None:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _interval(row: dict, name: str) -> str:
    """'0.573 [0.561, 0.585]', or '-' where the value is undefined."""
    value, low, high = row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high")
    if value is None:  # a metric without its own statistic: the area of proportion explained
        metric = row.get(f"{name}_metric")
        return "-" if metric is None else f"{metric:.3f} (of 1 - AUE/ATE)"
    return f"{value:.3f}" + ("" if low is None or high is None else f" [{low:.3f}, {high:.3f}]")


def curve_text(areas: list[dict], agreement: list[dict] | None = None) -> list[str]:
    """The curve sweep's headline as lines of text: CPR and CMD per ranking with their 95%
    intervals, best CPR first, then Spearman's rank agreement of every two rankings."""
    ordered = sorted(areas, key=lambda a: (a["cpr"] is None, -(a["cpr"] or 0.0), a["ranking"]))
    width = max([len("ranking")] + [len(a["ranking"]) for a in ordered])
    cells = [(a["ranking"], _interval(a, "cpr"), _interval(a, "cmd")) for a in ordered]
    cw = max([len("CPR (higher: better)")] + [len(c[1]) for c in cells])
    lines = []
    if cells:
        lines += ["CPR and CMD per ranking, 95% paired-bootstrap intervals",
                  f"{'ranking':<{width}}  {'CPR (higher: better)':<{cw}}  CMD (lower: better)"]
        lines += [f"{r:<{width}}  {cpr:<{cw}}  {cmd}" for r, cpr, cmd in cells]
    if agreement:
        pairs = [(f"{a['method_a']} ~ {a['method_b']}", a) for a in agreement]
        pw = max(len(p) for p, _ in pairs)
        lines += [""] if lines else []
        lines += ["rank agreement (Spearman's rho of the rankings' scores)",
                  f"{'rankings':<{pw}}  edges  signed  |score|"]
        lines += [f"{p:<{pw}}  {a['n_edges']:>5}  {_rho(a['spearman']):>6}  "
                  f"{_rho(a['spearman_abs']):>7}" for p, a in pairs]
    return lines


def _rho(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def text_axes(ax, lines: list[str], fontsize: float = 9) -> None:
    """Lines of monospaced text in an axes without frame or ticks (a table a PNG can carry)."""
    ax.set_axis_off()
    ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=fontsize, va="top",
            ha="left", transform=ax.transAxes)


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


CHAR_INCH = 0.06
"""Width of one character of the panels' 7-point labels, in inches (a figure's width is sized
from its longest label, so no label is clipped)."""


def report_figure(scores, title: str = "", per_example: dict[str, list[float]] | None = None,
                  curve: tuple[list[dict], list[dict]] | None = None,
                  circuit: tuple[list[tuple[float, str, str, str | None]], str] | None = None,
                  agreement: list[dict] | None = None, note: str = "") -> Figure:
    """All panels that apply to these scores (rows with their facts: see the module's
    docstring), in one figure sized to its content, the result first.

    A curve sweep (`curve`: the `faithfulness` and `curve_scores` rows) opens with its two
    faithfulness panels (signed, absolute), then CPR and CMD per ranking with intervals and
    the rankings' `agreement` as text beside the `circuit` (weighted edges and a title); its
    curve members are not listed again. Other hypotheses get the interval and spread panels
    (`per_example`: hypothesis -> each pair's 1 - UE/TE; `note` is printed under them), then
    the node and edge panels where the sweep removes nodes or edges. Legends sit outside the
    data; the layout is constrained, so no text leaves the figure.
    """
    rows = _rows(scores)
    has_curve = curve is not None and bool(curve[0])
    listed = [r for r in rows if not (has_curve and r.get("family") == "circuit_curve")]
    listed_n = len(least_explained(listed))
    sections: list[tuple[str, float, float]] = []  # (kind, width, height) in inches
    if has_curve:
        sections.append(("curves", 13.0, 5.0))
    lines = curve_text(curve[1] if has_curve else [], agreement)
    if lines:  # the curves' CPR and CMD, the rankings' agreement: the numbers, as text
        text_width = 0.075 * max(len(line) for line in lines) + 0.4
        circuit_width = 6.5 if has_curve and circuit is not None and circuit[0] else 0.0
        sections.append(("headline", text_width + circuit_width,
                         max(4.5 if circuit_width else 0.0, 0.16 * len(lines) + 0.3)))
    if listed_n:
        label = max(len(f"{r['hypothesis']} (n={r.get('n', '?')})") for r in
                    least_explained(listed))
        width = 4.0 + CHAR_INCH * label + (5.5 if per_example else 0.0)
        sections.append(("list", width, 0.24 * listed_n + 2.0 + (0.3 if note else 0.0)))
    structure = []
    if node_matrix(listed) is not None:
        structure.append(heatmap_axes)
    if _edge_removals(listed):
        structure += [edges_axes, edge_layers_axes]
    if structure:
        sections.append(("structure", 6.0 * len(structure), 5.0))
    if not sections:
        sections.append(("list", 6.0, 3.0))
    width = max(w for _, w, _ in sections)
    heights = [h for _, _, h in sections]
    fig = Figure(figsize=(width, sum(heights) + (0.5 if title else 0.0)), layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (kind, _, _) in zip(subfigs, sections, strict=True):
        if kind == "curves":
            axes = sub.subplots(1, 2, sharey=True)
            curve_axes(axes[0], *curve, ordering="signed")
            curve_axes(axes[1], *curve, ordering="absolute")
            axes[1].set_ylabel("")
            axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                           borderaxespad=0, title="ranking", title_fontsize=8)
        elif kind == "headline":
            drawn = circuit_width > 0
            axes = sub.subplots(1, 2 if drawn else 1, squeeze=False,
                                width_ratios=[text_width, circuit_width] if drawn else None)[0]
            text_axes(axes[0], lines)
            if drawn:
                circuit_axes(axes[1], *circuit)
        elif kind == "list":
            axes = sub.subplots(1, 2 if per_example else 1, squeeze=False)[0]
            intervals_axes(axes[0], listed)
            if per_example:
                spread_axes(axes[1], listed, per_example)
            if note:
                sub.supxlabel(textwrap.fill(note, int(width * 13)), fontsize=8)
        else:
            axes = sub.subplots(1, len(structure), squeeze=False)[0]
            for ax, panel in zip(axes, structure, strict=True):
                panel(ax, listed)
    if title:
        fig.suptitle(textwrap.fill(title, int(width * 9)))
    return fig
