"""The wheel `pip install .` builds holds every file of the source tree that the code reads: a module, a package
or a data file left out would only show after a plain install, where the source tree is not on the path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# where the source tree's files land in the wheel (pyproject.toml: models/ installs as vae_engine.shipped)
INSTALLED_AS = {"vae_engine": "vae_engine", "models": "vae_engine/shipped"}
LOCAL_ONLY = ("tuning.json",)  # a machine's own --precision auto decisions, never shipped


def source_files() -> list[str]:
    """The wheel names of every tracked file under the packaged folders (the working tree where git is absent)."""
    try:
        listed = subprocess.run(["git", "ls-files", *INSTALLED_AS], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for top in INSTALLED_AS for p in (ROOT / top).rglob("*") if p.is_file()]
    names = []
    for rel in listed:
        top, _, rest = rel.partition("/")
        if "__pycache__" in rel or rel.endswith(".pyc") or Path(rel).name in LOCAL_ONLY:
            continue
        names.append(f"{INSTALLED_AS[top]}/{rest}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("vae_engine-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_source_file(wheel):
    names = set(wheel.namelist())
    missing = [f for f in source_files() if f not in names]
    assert not missing, f"the wheel lacks {missing[:20]}"
    # the parts whose absence broke installs before, named so a failure reads plainly
    for f in ("vae_engine/likelihoods/__init__.py", "vae_engine/web/index.html",
              "vae_engine/assets/mnist/t10k-images-idx3-ubyte.gz", "vae_engine/shipped/mnist-vae/config.json",
              "vae_engine/shipped/mnist-vae/encoder.onnx"):
        assert f in names


def test_wheel_holds_nothing_local(wheel):
    names = wheel.namelist()
    assert not [n for n in names if Path(n).name in LOCAL_ONLY or "__pycache__" in n or n.startswith("tests/")]
    assert any(n.endswith("entry_points.txt") for n in names)
