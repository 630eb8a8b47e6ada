"""The CLI end to end through Typer's CliRunner: outputs, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vae_engine.cli import app

from .conftest import one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    """`--help` lists every command the app has, and each command's own `--help` explains every option."""
    result = invoke("--help")
    assert result.exit_code == 0
    commands = typer_commands()
    assert {"train", "evaluate", "export", "info", "tune", "encode", "decode", "sample", "reconstruct", "score",
            "detect", "serve", "bench"} <= set(commands)
    for name, command in commands.items():
        assert name in result.output, name
        own = invoke(name, "--help")
        assert own.exit_code == 0, (name, own.output)
        options = [p for p in command.params if p.param_type_name == "option"]  # Typer's own copy of click
        assert options or name == "info", name  # info takes only the model folder
        for param in options:
            assert param.help, f"{name} {param.opts[0]} has no help text"


def typer_commands() -> dict:
    import typer

    return dict(typer.main.get_command(app).commands)


@pytest.mark.slow  # ~10 s: trains, exports and evaluates
def test_train_and_evaluate_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--data-dir", tiny_data, "--out", out, "--epochs", 2, "--batch-size", 32,
                    "--latent-dim", 2, "--hidden", "32", "--threads", 2)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "train_state.safetensors"):
        assert (out / name).is_file()
    for name in ("training_curve", "reconstructions", "samples", "latent_traversal", "interpolation", "manifold"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    result = invoke("evaluate", out, "--k", 16, "--limit", 20, "--json", tmp_path / "ev.json")
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 20 and ev["k"] == 16 and 0 < ev["test_nll"] < ev["test_nelbo"] + 1
    result = invoke("train", "--data-dir", tiny_data, "--out", out, "--epochs", 3, "--batch-size", 32, "--resume",
                    "--no-plots")
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_inputs_give_one_line(tmp_path, tiny_data):
    one_line_error(invoke("train", "--data-dir", tmp_path / "missing", "--out", tmp_path / "o"), "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("train", "--data-dir", tmp_path / "empty", "--out", tmp_path / "o"), "missing")
    one_line_error(invoke("train", "--epochs", 0, "--out", tmp_path / "o"), "epochs")
    one_line_error(invoke("train", "--latent-dim", 0, "--out", tmp_path / "o"), "latent dim")
    one_line_error(invoke("train", "--hidden", "a,b", "--out", tmp_path / "o"), "--hidden")
    one_line_error(invoke("train", "--data-dir", tiny_data, "--batch-size", 100000, "--out", tmp_path / "o"),
                    "larger than the training set")
    one_line_error(invoke("train", "--data-dir", tiny_data, "--device", "tpu", "--out", tmp_path / "o"),
                    "unknown device 'tpu'")
    if not torch.cuda.is_available():
        one_line_error(invoke("train", "--data-dir", tiny_data, "--device", "cuda", "--out", tmp_path / "o"),
                        "--device cuda: torch sees no CUDA GPU here")
    one_line_error(invoke("evaluate", tmp_path / "nomodel"), "not found")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{not json")
    one_line_error(invoke("evaluate", tmp_path / "half"), "not valid JSON")
    assert not (tmp_path / "o").exists()


def test_corrupt_idx_gives_one_line(tmp_path, tiny_data):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data, bad)
    path = bad / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    one_line_error(invoke("train", "--data-dir", bad, "--out", tmp_path / "o"), "train-images-idx3-ubyte.gz")
    assert not (tmp_path / "o").exists()


def test_a_job_bar_appears_only_after_work_worth_watching(monkeypatch):
    """A job's bar and status are drawn once work has lasted SHOW_AFTER (rich is never imported by a job that
    ends sooner); then the bar counts every item done before it appeared."""
    import time

    from vae_engine.cli import progress

    monkeypatch.setattr(progress, "SHOW_AFTER", 60.0)
    with progress.Meter("encode") as quick:
        quick.start(10)
        quick.advance(10)
        assert quick.bar is None
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.05)
    with progress.Meter("encode") as slow:
        slow.start(10)
        slow.advance(3)
        deadline = time.monotonic() + 10
        while slow.bar is None and time.monotonic() < deadline:  # the timer shows the bar while nothing advances
            time.sleep(0.05)
        assert slow.bar is not None and slow.bar.tasks[0].completed == 3
        slow.advance(4)
        assert slow.bar.tasks[0].completed == 7
    with progress.lazy_status("choosing") as status:
        status.update("measuring: onnxruntime/fp32")  # progress reported: shown at once
    monkeypatch.setattr(progress, "SHOW_AFTER", 60.0)
    with progress.lazy_status("choosing"):
        pass  # nothing to show, nothing shown


def test_the_command_line_imports_rich_only_to_draw():
    """Loading the CLI imports no rich (~20 ms): a bar, a status or a table imports it when drawn (a job's bar
    after SHOW_AFTER seconds, which the test above checks without a clock-dependent subprocess)."""
    import subprocess
    import sys

    code = "import sys; from vae_engine.cli import app, main; print(sorted(m for m in sys.modules if 'rich' in m))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_one_command_app_equals_the_whole_app():
    """`main` builds only the invoked command (Typer otherwise builds all of them on every run): its options, help
    and name are the whole app's."""
    import typer.main

    from vae_engine.cli.commands import _only, app

    whole = typer.main.get_command(app)
    for name, command in whole.commands.items():
        one = typer.main.get_command(_only(name))
        assert list(one.commands) == [name]
        mine = one.commands[name]
        assert [p.opts for p in mine.params] == [p.opts for p in command.params], name
        assert mine.help == command.help
    assert _only("--help") is None and _only("encde") is None
