"""PNG plots of the profiling and allocation: what a user looks at first to choose the budget."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    # Here, not at the top: the Agg backend is chosen when a plot is drawn, so importing the library leaves a
    # notebook's backend alone.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(sim: dict, out: Path, allocation: dict | None = None) -> Path:
    """Left: layer score T_i (line) with experts per layer (bars, if given). Right: every pair's curve."""
    plt = _pyplot()
    layers = list(range(len(sim["layer_score"])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    if allocation is not None:
        bars = left.twinx()
        colors = ["tab:orange" if i in allocation["classifier_layers"] else "tab:blue" for i in layers]
        bars.bar(layers, allocation["experts_per_layer"], color=colors, alpha=0.35)
        bars.set_ylabel("experts N_i (orange: classifier layer)")
        left.set_zorder(bars.get_zorder() + 1)
        left.patch.set_visible(False)
        left.set_title(f"{allocation['method']}, budget {allocation['budget']}: Σ N_i = {allocation['total_experts']}")
    else:
        left.set_title("layer score T_i")
    left.plot(layers, sim["layer_score"], "k-o", markersize=3)
    left.set_xlabel("layer")
    left.set_ylabel("T_i (mean cosine similarity)")
    for name, curve in sim["pairs"].items():
        right.plot(layers, curve, label=name, linewidth=1)
    right.set_xlabel("layer")
    right.set_ylabel("S_ab")
    right.set_title(f"pair similarity (new: {','.join(sim['new'])}; old: {','.join(sim['old'])})")
    right.legend(fontsize=7, ncol=2)
    if len(layers) <= 40:
        for axis in (left, right):
            axis.set_xticks(layers)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
