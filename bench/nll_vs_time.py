"""Plot test NLL against training time for model folders trained with `--nll-every` (README: "A recipe").

    python bench/nll_vs_time.py runs/recipe models/mnist-vae --out bench/results/nll_vs_time.png

Each folder's metrics.jsonl gives its curve (cumulative epoch seconds, evaluation excluded); folders without NLL
checks are skipped with a note. Published reference lines (Burda et al. 2015, Kingma et al. 2016) are drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae_engine import modeldir
from vae_engine.core.figures import nll_against_time

REFERENCES = {"IWAE k=50, one stochastic layer (Burda 2015): 84.78": 84.78,
              "IWAE k=50, two stochastic layers (Burda 2015): 82.90": 82.90,
              "ResNet VAE, no flows (Kingma 2016): 81.08": 81.08}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nll_vs_time.png")
    args = p.parse_args(argv)
    runs = {}
    for folder in args.folders:
        rows = modeldir.read_metrics(folder)
        if not any("test_nll_k1000" in r for r in rows):
            print(f"{folder}: no NLL checks in its metrics (train it with --nll-every N); skipped", file=sys.stderr)
            continue
        last = [r for r in rows if "test_nll_k1000" in r][-1]
        runs[f"{folder.name}: {last['test_nll_k1000']:.2f} after {sum(r['seconds'] for r in rows) / 60:.0f} min"] = rows
    if not runs:
        print("error: no folder has NLL checks", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nll_against_time(runs, args.out, REFERENCES)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
