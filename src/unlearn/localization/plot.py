"""The picture of a mask: which layers and module types hold the selected weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _layer_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


def heatmap(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Rows: layers; columns: module types; colour: share of that cell's weights selected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from unlearn.outputs import atomic_path

    grid = summary["grid"]
    layers = sorted((k for k in grid if k != "-"), key=_layer_key) or sorted(grid)
    modules = sorted({m for k in layers for m in grid[k]})
    data = np.full((len(layers), len(modules)), np.nan)
    for i, layer in enumerate(layers):
        for j, mod in enumerate(modules):
            cell = grid[layer].get(mod)
            if cell and cell["weights"]:
                data[i, j] = 100.0 * cell["selected"] / cell["weights"]
    size = (max(5.0, 1.6 + 0.8 * len(modules)), max(3.0, 1.6 + 0.26 * len(layers)))
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="% of weights selected")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
