"""Write real datasets that scikit-learn bundles (no network) in the formats `vae-engine train --data` reads.

    python examples/own_data.py DIR

DIR/digits.npy           1,797 8x8 grey digits, values 0..16 scaled to [0, 1] (float32, (N, 8, 8))
DIR/digits_labels.npz    the same as x with their labels y (for plots coloured by label)
DIR/breast_cancer.csv    569 x 30 real-valued features with a header row (a real table)
DIR/patches.npy          RGB 32x32 patches cut from scikit-learn's two sample photos, uint8 (N, 3, 32, 32)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np


def main(out: Path) -> None:
    from sklearn.datasets import load_breast_cancer, load_digits, load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    np.save(out / "digits.npy", x)
    np.savez(out / "digits_labels.npz", x=x, y=digits.target)
    cancer = load_breast_cancer()
    with open(out / "breast_cancer.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([name.replace(" ", "_") for name in cancer.feature_names])
        writer.writerows(cancer.data.tolist())
    patches = []
    for photo in load_sample_images().images:  # two 427x640 RGB photos
        for r in range(0, photo.shape[0] - 32 + 1, 12):
            for c in range(0, photo.shape[1] - 32 + 1, 12):
                patches.append(photo[r : r + 32, c : c + 32].transpose(2, 0, 1))
    np.save(out / "patches.npy", np.stack(patches).astype(np.uint8))
    print(f"wrote {out}: digits {x.shape}, breast_cancer {cancer.data.shape}, patches {len(patches)}x3x32x32")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
