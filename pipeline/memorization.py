"""The memorization report, a picture: the generated images nearest to a training painting, each
above that painting with their distance (1 - |cos| of their features, as MiFID measures it), and
the histogram of every generated image's nearest-painting distance with the competition's 0.1
threshold marked. A generator that copies paintings shows its copies first, at distance ~0."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.files import atomic_path
from pipeline.metrics import MIFID_EPS


def closest(distance: np.ndarray, k: int) -> list[int]:
    """Indices of the k generated images nearest to a painting, nearest first (NaN rows never)."""
    order = np.argsort(np.where(np.isnan(distance), np.inf, distance), kind="stable")
    return [int(i) for i in order[:k] if not np.isnan(distance[i])]


def draw(generated: list[np.ndarray], paintings: list[np.ndarray], distances: list[float],
         all_distances: np.ndarray, path: Path, threshold: float = MIFID_EPS) -> None:
    """The picture: pairs (generated above its nearest painting) on top, the histogram below."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    k = max(1, len(generated))
    fig = plt.figure(figsize=(1.6 * max(k, 5), 6.2))
    grid = fig.add_gridspec(3, k, height_ratios=[1, 1, 1.3])
    for col, (gen, paint, d) in enumerate(zip(generated, paintings, distances)):
        for row, (img, label) in enumerate(((gen, f"d = {d:.3g}"), (paint, "painting"))):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(img)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    ax = fig.add_subplot(grid[2, :])
    values = all_distances[~np.isnan(all_distances)]
    ax.hist(values, bins=50, color="#4a6fa5")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"MiFID threshold {threshold}")
    ax.set_xlabel("distance of each generated image to its nearest painting (1 - |cos|)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.suptitle(f"Nearest to a training painting: {len(values)} generated images, "
                 f"{int((values < threshold).sum())} under the threshold", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
