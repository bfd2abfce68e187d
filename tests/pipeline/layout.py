"""What the report tests check of a figure's layout: geometry, not pixels."""


def check_layout(fig) -> None:
    """Every visible text inside the figure, and every legend off its axes' data area."""
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the report closed its figure: draw it again, as saved
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox

    def inside(b, what: str) -> None:
        assert (b.x0 >= box.x0 - 1 and b.x1 <= box.x1 + 1 and b.y0 >= box.y0 - 1
                and b.y1 <= box.y1 + 1), f"{what} leaves the figure: {b} (figure {box})"

    axes = fig.findobj(Axes)
    assert axes
    for ax in axes:  # what each axes draws: tick and axis labels, title, legend, texts
        inside(ax.get_tightbbox(renderer), f"panel {ax.get_title()[:40]!r}")
    figures, texts = [fig], []
    while figures:  # the figure's and its subfigures' own texts: titles, notes
        f = figures.pop()
        figures += f.subfigs
        texts += f.texts
    assert texts
    for text in texts:
        if text.get_visible() and text.get_text().strip():
            inside(text.get_window_extent(renderer), f"text {text.get_text()[:40]!r}")
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            lb, ab = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            overlap = (min(lb.x1, ab.x1) - max(lb.x0, ab.x0), min(lb.y1, ab.y1) - max(lb.y0, ab.y0))
            assert min(overlap) <= 1, f"a legend over the data of {ax.get_title()!r}"
