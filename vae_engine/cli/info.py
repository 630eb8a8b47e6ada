"""`vae-engine info`: what a model directory holds, printed with rich."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .. import modeldir
from ..core.errors import ModelDirError
from ..modeldir import graphs


def describe(model_dir: str | Path, console: Console) -> None:
    """Print config, metrics, graphs (with metadata, sizes and whether they match the weights) and evaluation."""
    model_dir = Path(model_dir)
    cfg = modeldir.read_config(model_dir)
    model_cfg = modeldir.model_config(model_dir)
    console.print(f"[bold]{model_dir}[/]  (format {cfg.get('format', '?')})")
    t = Table(title="configuration", show_header=False)
    trainer_only = () if model_cfg.trained else ("hidden", "activation", "standardize", "pseudo_inputs")
    for section in ("model", "train", "data"):
        for key, value in cfg.get(section, {}).items():
            if value is None or (section == "model" and key in trainer_only):
                continue
            if section == "model" and key == "imported":  # the source's own config is long: its class and sizes
                source = value.get("config") or {}
                value = {k: v for k, v in value.items() if k != "config"} | (
                    {"class": source.get("_class_name"), "block_out_channels": source.get("block_out_channels")}
                    if source else {})
            t.add_row(f"{section}.{key}", str(value)[:200])
    console.print(t)

    weights = model_dir / modeldir.WEIGHTS
    sha = modeldir.weights_sha256(model_dir) if weights.is_file() else None
    console.print(f"weights: {weights.name} " + (f"({weights.stat().st_size / 1e6:.2f} MB, sha256 {sha[:12]}…)"
                                                 if sha else "[red]missing[/]"))
    rows = modeldir.read_metrics(model_dir)
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
            try:  # metadata only (no onnx import): every graph is fully checked when a backend loads it
                meta = graphs.read_metadata(path)
            except ModelDirError as exc:
                reason = str(exc).removeprefix(f"{path}: ")
                g.add_row(path.name, f"{path.stat().st_size / 1e6:.2f}", variant, "-", f"[red]{reason}[/]")
                continue
            want = graphs.spec(role, model_cfg)
            declared = (_signature(meta, "inputs"), _signature(meta, "outputs"))
            sig = " -> ".join(", ".join(f"{n}[{f}]" for n, f in side) if side is not None else "?" for side in declared)
            if declared != (list(want.inputs), list(want.outputs)):
                state = "[red]signature differs from config.json: re-export[/]"
            else:
                state = "match" if meta.get("vae_engine.weights_sha256") == sha else "[red]stale: re-export[/]"
            g.add_row(path.name, f"{path.stat().st_size / 1e6:.2f}", meta.get("vae_engine.variant", "?"), sig, state)
    console.print(g if g.row_count else "ONNX graphs: none (run `vae-engine export`)")
    _export_accuracy(model_dir, console)
    _evaluation(model_dir, console)
    _tuning(model_dir, console)


def _signature(meta: dict[str, str], side: str) -> list[tuple[str, int]] | None:
    """The inputs or outputs a graph's metadata declares, [(name, features), ...], or None when malformed."""
    try:
        pairs = [(str(n), int(f)) for n, f in json.loads(meta.get(f"vae_engine.{side}", "[]"))]
    except (ValueError, TypeError):
        return None
    return pairs


def _report(path: Path, console: Console) -> dict | None:
    """A JSON report of the folder, or None (with a note) when it is missing or malformed."""
    if not path.is_file():
        return None
    try:
        report = modeldir.read_json(path, "report")
    except ModelDirError as exc:
        console.print(f"[yellow]note:[/] {exc}")
        return None
    if not isinstance(report, dict):
        console.print(f"[yellow]note:[/] {path}: not a JSON object; ignored")
        return None
    return report


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _export_accuracy(model_dir: Path, console: Console) -> None:
    report = _report(model_dir / modeldir.EXPORT_REPORT, console)
    variants = report.get("variants") if report else None
    if not isinstance(variants, list) or not variants:
        return
    t = Table(title="export accuracy on the test set (vs fp32)")
    for col in ("variant", "test -ELBO", "change (nats)", "max |logit err|"):
        t.add_column(col, justify="right")
    for v in (v for v in variants if isinstance(v, dict)):
        t.add_row(str(v.get("variant", "?")), _num(v.get("test_nelbo"), ".3f"),
                  _num(v.get("test_nelbo_change_nats"), "+.4f"), _num(v.get("test_max_abs_logit_err"), ".2e"))
    console.print(t)


def _tuning(model_dir: Path, console: Console) -> None:
    """The saved `--precision auto` decisions: the path chosen per machine, batch and budget, and what was measured."""
    from ..core import hardware
    from ..runtime import tuning

    here = hardware.cpu_info()[0]
    for d in tuning.saved(model_dir):
        if isinstance(d.get("measurements"), list):
            k = d["key"]
            console.print(decision_table(d, "this CPU" if k.get("cpu") == here else f"another CPU ({k.get('cpu')})"))


def decision_table(d: dict, where: str) -> Table:
    """One `--precision auto` decision as a table: every path timed, its speed and its accuracy cost."""
    k = d["key"]
    t = Table(title=f"--precision auto on {where}: batch {k.get('batch')}, {k.get('threads')} threads, "
                    f"budget {k.get('budget_nats')} nats -> {d.get('backend')}/{d.get('precision')}"
                    + (f", {d['threads']} threads" if "threads" in d else ""))
    t.add_column("path", no_wrap=True)
    for col in ("threads", "items/s", "spread", "mean NLL change", "mean -ELBO change", "max item change"):
        t.add_column(col, justify="right")
    for r in (r for r in d["measurements"] if isinstance(r, dict)):
        cost = (lambda v, f: "-") if r.get("precision") == "fp32" else _num  # fp32: the reference's arithmetic
        chosen = ((r.get("backend"), r.get("precision"), r.get("threads", d.get("threads")))
                  == (d.get("backend"), d.get("precision"), d.get("threads")))
        t.add_row(("* " if chosen else "") + f"{r.get('backend')}/{r.get('precision')}",
                  str(r.get("threads", k.get("threads"))), _num(r.get("items_per_s"), ",.0f"),
                  _num(r.get("spread"), ".0%"), cost(r.get("nll_change_nats"), "+.4f"),
                  cost(r.get("nelbo_change_nats"), "+.4f"), cost(r.get("max_item_nll_change_nats"), ".3f"))
    return t


def _evaluation(model_dir: Path, console: Console) -> None:
    ev = _report(model_dir / modeldir.EVALUATION, console)
    if ev:
        console.print(f"evaluation: test -ELBO {_num(ev.get('test_nelbo'), '.3f')}, "
                      f"NLL {_num(ev.get('test_nll'), '.3f')} (k={ev.get('k', '?')})")
        console.print(f"  {ev.get('n', '?')} test items, seed {ev.get('seed', '?')}, backend {ev.get('backend', '?')}")
