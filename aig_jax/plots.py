"""PNG plots of gate behaviour.

Figures are built with matplotlib's object API (``Figure``), which needs no display and no
global backend state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def class_layer_heatmap(
    matrix: np.ndarray,
    path: str,
    *,
    class_names: Sequence[str] | None = None,
    block_names: Sequence[str] | None = None,
    ungated: Sequence[bool] | None = None,
    title: str = "execution rate per class and block",
) -> None:
    """Save the [K, L] class × block execution-rate matrix as a heatmap PNG at ``path``.

    Rows are classes in the given order, columns blocks; ungated blocks are marked with a
    dot under their column.
    """
    k, n = matrix.shape
    fig = Figure(figsize=(max(6.0, 0.18 * n + 2), max(3.0, 0.25 * min(k, 60) + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(
        matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_xlabel("residual block")
    ax.set_ylabel("class")
    ax.set_title(title)
    if block_names is not None and n <= 60:
        ax.set_xticks(range(n), block_names, rotation=90, fontsize=6)
    if class_names is not None and k <= 60:
        ax.set_yticks(range(k), class_names, fontsize=7)
    if ungated is not None:
        cols = [i for i, u in enumerate(ungated) if u]
        ax.plot(cols, [k - 0.5 + 0.3] * len(cols), "k.", clip_on=False)
    fig.colorbar(im, ax=ax, label="execution rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
