"""`vae-engine info`: what a model directory holds, printed with rich."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import checkpoint, graphs
from .config import ModelConfig, from_dict
from .errors import ModelDirError


def describe(model_dir: str | Path, console: Console) -> None:
    """Print config, metrics, graphs (with metadata, sizes and whether they match the weights) and evaluation."""
    model_dir = Path(model_dir)
    cfg = checkpoint.read_config(model_dir)
    model_cfg = from_dict(ModelConfig, cfg["model"])
    console.print(f"[bold]{model_dir}[/]  (format {cfg.get('format', '?')})")
    t = Table(title="configuration", show_header=False)
    for section in ("model", "train", "data"):
        for key, value in cfg.get(section, {}).items():
            if value is not None:
                t.add_row(f"{section}.{key}", str(value))
    console.print(t)

    weights = model_dir / checkpoint.WEIGHTS
    sha = checkpoint.weights_sha256(model_dir) if weights.is_file() else None
    console.print(f"weights: {weights.name} " + (f"({weights.stat().st_size / 1e6:.2f} MB, sha256 {sha[:12]}…)"
                                                 if sha else "[red]missing[/]"))
    rows = checkpoint.read_metrics(model_dir)
    if rows:
        last = rows[-1]
        console.print(f"training: {len(rows)} epochs, {sum(r['seconds'] for r in rows):.0f} s; last epoch train loss "
                      f"{last['train_loss']:.3f}, test -ELBO {last['test_nelbo']:.3f}")

    g = Table(title="ONNX graphs")
    for col in ("file", "MB", "variant", "signature", "weights"):
        g.add_column(col)
    for variant in graphs.VARIANTS:
        for role in graphs.ROLES:
            path = graphs.graph_path(model_dir, role, variant)
            if not path.is_file():
                continue
            try:
                meta = graphs.metadata(graphs.load_graph(path, role, model_cfg))
            except ModelDirError as exc:
                g.add_row(path.name, f"{path.stat().st_size / 1e6:.2f}", variant, "-", f"[red]{exc}[/]")
                continue
            same = meta.get("vae_engine.weights_sha256") == sha
            sig = " -> ".join(", ".join(f"{n}[{f}]" for n, f in json.loads(meta.get(f"vae_engine.{k}", "[]")))
                              for k in ("inputs", "outputs"))
            g.add_row(path.name, f"{path.stat().st_size / 1e6:.2f}", meta.get("vae_engine.variant", "?"), sig,
                      "match" if same else "[red]stale: re-export[/]")
    console.print(g if g.row_count else "ONNX graphs: none (run `vae-engine export`)")
    report = model_dir / "export_report.json"
    if report.is_file():
        for v in json.loads(report.read_text()).get("variants", []):
            console.print(f"export accuracy {v['variant']:>9}: test -ELBO {v['test_nelbo']:.3f} "
                          f"({v['test_nelbo_change_nats']:+.4f} nats), "
                          f"max |logit err| {v['test_max_abs_logit_err']:.2e}")
    evaluation = model_dir / checkpoint.EVALUATION
    if evaluation.is_file():
        ev = json.loads(evaluation.read_text())
        console.print(f"evaluation: test -ELBO {ev['test_nelbo']:.3f}, NLL {ev['test_nll']:.3f} (k={ev['k']}, "
                      f"{ev['n']} images, seed {ev['seed']}, backend {ev['backend']})")
