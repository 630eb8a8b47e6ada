"""Anomaly detection side by side, in one run: vae-engine's VAEOutlierDetector (every scoring rule) against
PyOD's VAE (its defaults) and scikit-learn's IsolationForest, on
1. MNIST one-class: fit on training images of nine digits, score the test set, the held-out digit is the anomaly;
2. scikit-learn's breast cancer table (benign normal, malignant anomalies), and digits, wine and iris with one
   class held out (digits: class 0; wine and iris: each of their three classes).
Reports ROC AUC, average precision, fit seconds, seconds to score, and whether two calls give identical scores.

    python bench/detect_bench.py --digits 0,7 --train 12000 --json detect.json --markdown detect.md

PyOD is optional (pip install pyod tqdm); without it its rows are left out with a note. Threads: --threads (2).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from vae_engine import data
from vae_engine.anomaly.detector import RULES, VAEOutlierDetector
from vae_engine.perf.timing import measure


def mnist_one_class(digit: int, n_train: int, seed: int = 0):
    """(train, test, is_anomaly): train on n_train images of the other digits, test = the whole test set."""
    ds = data.load_dataset("mnist")
    keep = np.flatnonzero(ds.train_labels != digit)
    keep = np.random.default_rng(seed).permutation(keep)[:n_train]
    x_tr = ds.train_images[keep].reshape(len(keep), -1).astype(np.float32) / 255
    x_te = ds.test_images.reshape(len(ds.test_images), -1).astype(np.float32) / 255
    return x_tr, x_te, (ds.test_labels == digit).astype(int)


def breast_cancer(seed: int = 0):
    x, y = load_breast_cancer(return_X_y=True)
    normal = np.random.default_rng(seed).permutation(np.flatnonzero(y == 1))
    tr, te = normal[:250], np.concatenate([normal[250:], np.flatnonzero(y == 0)])
    return x[tr].astype(np.float32), x[te].astype(np.float32), (y[te] == 0).astype(int)


def digits_one_class(digit: int, seed: int = 0):
    return sklearn_one_class(load_digits, digit, seed, scale=16)


def sklearn_one_class(loader, held: int, seed: int = 0, scale: float = 1.0):
    """One of scikit-learn's bundled labelled sets as a one-class problem: a seeded half for training without the
    held-out class, the other half (every class) for testing, the held-out class the anomaly."""
    x, y = loader(return_X_y=True)
    x = (x / scale).astype(np.float32)
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, te = idx[: len(x) // 2], idx[len(x) // 2 :]
    tr = tr[y[tr] != held]
    return x[tr], x[te], (y[te] == held).astype(int)


def _row(name, scores_fn, fit_s, x_te, is_anomaly):
    """Scores twice: the first call (what a user's first call costs: sessions, JIT compilation) and a warm one,
    the `score_s` reported; the two must be identical."""
    t0 = time.perf_counter()
    normal = scores_fn(x_te)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = scores_fn(x_te)
    score_s = time.perf_counter() - t0
    return {"detector": name, "roc_auc": float(roc_auc_score(is_anomaly, -normal)),
            "average_precision": float(average_precision_score(is_anomaly, -normal)), "fit_s": fit_s,
            "score_s": score_s, "first_call_s": first_s, "n_scored": len(x_te),
            "identical_on_second_call": bool(np.array_equal(normal, again))}


def run_case(case: str, x_tr, x_te, is_anomaly, epochs, threads: int) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    det = VAEOutlierDetector(epochs=epochs, random_state=0, threads=threads).fit(x_tr)
    fit_s = time.perf_counter() - t0
    for rule in RULES:
        det.set_params(rule=rule)
        rows.append({**_row(f"vae-engine {rule}", det.score_samples, fit_s, x_te, is_anomaly),
                     "likelihood": det.likelihood_})
    t0 = time.perf_counter()
    forest = IsolationForest(random_state=0).fit(x_tr)
    rows.append(_row("IsolationForest", forest.score_samples, time.perf_counter() - t0, x_te, is_anomaly))
    try:
        from pyod.models.vae import VAE
    except ImportError:
        rows.append({"detector": "pyod VAE", "note": "pyod not installed"})
    else:
        t0 = time.perf_counter()
        pyod = VAE(random_state=0, verbose=0).fit(x_tr)
        rows.append(_row("pyod VAE (defaults)", lambda x: -pyod.decision_function(x), time.perf_counter() - t0,
                         x_te, is_anomaly))
    return [{"case": case, **r} for r in rows]


def matched_cost(digit: int, n_train: int, threads: int) -> list[dict]:
    """Scoring speed, median of 5 warm calls on the 10,000 MNIST test images: the detector's defaults, the
    detector with PyOD's default network (784-128-64-32, latent 2: matched cost) and the reconstruction rule (one
    encoder and one decoder pass per item, as PyOD's decision_function), and PyOD's VAE."""
    from pyod.models.vae import VAE

    x_tr, x_te, is_anomaly = mnist_one_class(digit, n_train)
    default = VAEOutlierDetector(random_state=0, threads=threads).fit(x_tr)
    det = VAEOutlierDetector(rule="reconstruction", hidden=(128, 64, 32), latent_dim=2, random_state=0,
                             threads=threads).fit(x_tr)
    pyod = VAE(random_state=0, verbose=0).fit(x_tr)
    rows = []
    for name, fn in ((f"vae-engine defaults ({default.rule}, {default.likelihood_})", default.score_samples),
                     ("vae-engine reconstruction, PyOD's network", det.score_samples),
                     ("pyod VAE (defaults)", lambda x: -pyod.decision_function(x))):
        fn(x_te[:256])  # warm-up: sessions, JIT compilation
        times = measure(lambda fn=fn: fn(x_te), min_time=0.0, warmup=0, min_repeats=5, max_repeats=5).seconds
        normal = fn(x_te)
        rows.append({"case": f"MNIST, {digit} held out, matched network", "detector": name,
                     "roc_auc": float(roc_auc_score(is_anomaly, -normal)),
                     "average_precision": float(average_precision_score(is_anomaly, -normal)), "fit_s": float("nan"),
                     "score_s": float(np.median(times)), "n_scored": len(x_te),
                     "identical_on_second_call": bool(np.array_equal(normal, fn(x_te)))})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | detector | ROC AUC | AP | fit s | score s | same scores twice |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "roc_auc" in r:
            same = "yes" if r["identical_on_second_call"] else "no"
            lines.append(f"| {r['case']} | {r['detector']} | {r['roc_auc']:.3f} | {r['average_precision']:.3f} | "
                         f"{r['fit_s']:.1f} | {r['score_s']:.2f} | {same} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", default="7", help="MNIST held-out digits, comma-separated ('' for none)")
    ap.add_argument("--train", type=int, default=12000, help="MNIST training images (of the nine other digits)")
    ap.add_argument("--epochs", default="auto", help="VAEOutlierDetector epochs ('auto' or a number)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="detect_bench.json")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--matched", type=int, default=None, help="time scoring at matched cost on this digit")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    epochs = args.epochs if args.epochs == "auto" else int(args.epochs)
    rows = run_case("breast cancer", *breast_cancer(), epochs, args.threads)
    rows += run_case("sklearn digits, 0 held out", *digits_one_class(0), epochs, args.threads)
    for name, loader in (("wine", load_wine), ("iris", load_iris)):
        for held in (0, 1, 2):
            rows += run_case(f"sklearn {name}, class {held} held out", *sklearn_one_class(loader, held), epochs,
                             args.threads)
    print(markdown(rows), flush=True)
    for d in [int(t) for t in args.digits.split(",") if t.strip()]:
        rows += run_case(f"MNIST, {d} held out", *mnist_one_class(d, args.train), epochs, args.threads)
        print(markdown(rows), flush=True)
    if args.matched is not None:
        rows += matched_cost(args.matched, args.train, args.threads)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
