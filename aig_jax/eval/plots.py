"""PNG plots of gate behaviour.

Figures are built with matplotlib's object API (``Figure``), which needs no display and no
global backend state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    _save(fig, path)


def layer_rates_bars(
    rates: Mapping[str, Sequence[float]],
    path: str,
    *,
    block_names: Sequence[str],
    downsampling: Sequence[bool],
    title: str = "execution rate per block",
) -> None:
    """Grouped bars of per-block execution rates, one colour per entry of ``rates`` ({label:
    [L]}); downsampling blocks are marked with a ▼ above their group."""
    n = len(block_names)
    fig = Figure(figsize=(max(6.0, 0.3 * n * max(1, len(rates)) ** 0.5 + 2), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(rates))
    for i, (label, values) in enumerate(rates.items()):
        ax.bar(np.arange(n) + (i - (len(rates) - 1) / 2) * width, values, width, label=label)
    marks = [i for i, d in enumerate(downsampling) if d]
    ax.plot(marks, [1.04] * len(marks), "kv", markersize=5, label="downsampling", clip_on=False)
    ax.set_ylim(0, 1.08)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("execution rate")
    ax.set_title(title)
    if n <= 60:
        ax.set_xticks(range(n), block_names, rotation=90, fontsize=6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def histograms(
    values: Mapping[str, np.ndarray],
    path: str,
    *,
    bins: Sequence[float] | int,
    xlabel: str,
    title: str,
    reference: tuple[str, float] | None = None,
) -> None:
    """Overlaid histograms of the 1-D arrays in ``values`` ({label: [N]}), e.g. executed
    blocks or realised GMACs per image; an int ``bins`` spans all arrays together.
    ``reference`` = (label, x) draws a vertical line."""
    fig = Figure(figsize=(6.0, 3.5))
    ax = fig.subplots()
    if isinstance(bins, int):  # shared edges, so that the histograms are comparable
        every = np.concatenate([np.ravel(v) for v in values.values()]).astype(np.float64)
        lo, hi = float(every.min()), float(every.max())
        pad = 0.02 * (hi - lo) or 0.01 * abs(hi) or 0.5
        bins = list(np.linspace(lo - pad, hi + pad, bins + 1))
    for label, v in values.items():
        ax.hist(np.asarray(v, np.float64), bins=bins, alpha=0.6, label=label)
    if reference is not None:
        ax.axvline(reference[1], color="k", linestyle="--", label=reference[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


def difficulty(
    executed: np.ndarray,
    confidence: np.ndarray,
    correct: np.ndarray,
    accuracy_by_count: np.ndarray,
    path: str,
) -> None:
    """Executed blocks per image [N] against the model's confidence [N], correct images in
    blue and errors in red (left), and the accuracy [L + 1] of the images that executed 0 … L
    blocks (right; NaN where there are none)."""
    fig = Figure(figsize=(9.0, 3.5))
    left, right = fig.subplots(1, 2)
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(executed))
    correct = np.asarray(correct, bool)
    for mask, colour, label in ((correct, "tab:blue", "correct"), (~correct, "tab:red", "wrong")):
        left.scatter(
            executed[mask] + jitter[mask], confidence[mask], s=4, c=colour, alpha=0.4, label=label
        )
    left.set_xlabel("executed blocks")
    left.set_ylabel("confidence (max softmax)")
    left.legend(fontsize=7)
    used = np.flatnonzero(~np.isnan(accuracy_by_count))
    right.bar(used, 100 * accuracy_by_count[used], color="tab:green")
    right.set_xlabel("executed blocks")
    right.set_ylabel("accuracy (%)")
    right.set_xlim(-0.5, len(accuracy_by_count) - 0.5)
    fig.suptitle("executed blocks against difficulty")
    _save(fig, path)


def image_grid(
    rows: Mapping[str, np.ndarray],
    captions: Mapping[str, Sequence[str]],
    path: str,
    *,
    title: str,
) -> None:
    """One row of uint8 images [n, H, W, 3] per entry of ``rows``, each under a caption."""
    n = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.3 * n + 1.2, 1.6 * len(rows) + 0.4))
    axes = np.asarray(fig.subplots(len(rows), n, squeeze=False))
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
                ax.set_title(captions[label][c], fontsize=6)
        axes[r, 0].text(-0.1, 0.5, label, transform=axes[r, 0].transAxes, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def accuracy_vs_epsilon(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str
) -> None:
    """Accuracy (%) against the attack's ε (pixels of the 0–255 image), one line per entry of
    ``curves`` ({label: (epsilons, accuracies)})."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for label, (eps, acc) in curves.items():
        ax.plot(eps, acc, "o-" if "JPEG" not in label else "s--", label=label)
    ax.set_xlabel("ε (pixels of the 0–255 image)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("FGSM/BIM attack, with and without JPEG")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    _save(fig, path)
