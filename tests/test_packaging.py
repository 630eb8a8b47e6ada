"""The wheel `pip install .` builds holds every file of the source tree that the code reads: a module, a package
or a data file left out would only show after a plain install, where the source tree is not on the path."""

from __future__ import annotations

import os
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
    """The wheel built from a clean copy of the tree (as CI's clone is: a stale build/ folder here could hide a
    file the packaging forgets, or add one it excludes)."""
    import shutil

    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for rel in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / rel, src / rel)
    for top in INSTALLED_AS:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob("vae_engine-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_source_file(wheel):
    names = set(wheel.namelist())
    missing = [f for f in source_files() if f not in names]
    assert not missing, f"the wheel lacks {missing[:20]}"
    # the parts whose absence broke installs before, named so a failure reads plainly
    for f in ("vae_engine/model/likelihoods/__init__.py", "vae_engine/serving/web/index.html",
              "vae_engine/assets/mnist/t10k-images-idx3-ubyte.gz", "vae_engine/shipped/mnist-vae/config.json",
              "vae_engine/shipped/mnist-vae/encoder.onnx"):
        assert f in names


def test_wheel_holds_nothing_local(wheel):
    names = wheel.namelist()
    assert not [n for n in names if Path(n).name in LOCAL_ONLY or "__pycache__" in n or n.startswith("tests/")]
    assert any(n.endswith("entry_points.txt") for n in names)


# ---- what a new user sees: no foreign library's noise, and `info` without the heavy libraries ----


def test_info_imports_no_heavy_library():
    """`info` reads graph metadata from the protobuf bytes: no onnx (0.2-0.8 s to import), Numba, torch or NumPy."""
    code = ("import sys; sys.argv = ['vae-engine', 'info']; import vae_engine.cli as c\n"
            "try:\n    c.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'numba', 'torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ONNX graphs" in result.stdout and "match" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_graph_metadata_without_onnx(tmp_path):
    import onnx

    from vae_engine.core.errors import ModelDirError
    from vae_engine.modeldir import graphs

    for path in sorted((ROOT / "models" / "mnist-vae").glob("*.onnx")):
        assert graphs.read_metadata(path) == {p.key: p.value for p in onnx.load(path).metadata_props}, path.name
    raw = (ROOT / "models" / "mnist-vae" / "encoder.onnx").read_bytes()
    for name, data in (("truncated", raw[: len(raw) // 2]), ("noise", bytes(range(256)) * 8), ("empty", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelDirError, match="corrupt or truncated"):
            graphs.read_metadata(tmp_path / name)


def test_huge_image_is_one_error_and_no_warning(tmp_path):
    """A 144-megapixel PNG: Pillow's DecompressionBombWarning is not printed; the size check says what is wrong."""
    import warnings

    from PIL import Image

    from vae_engine.core.errors import DataError
    from vae_engine.data import readers

    Image.new("L", (12000, 12000)).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="too large"):
            readers.read_image(tmp_path / "big.png")
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.slow
def test_local_ray_job_prints_only_its_own_lines(tmp_path):
    pytest.importorskip("ray")
    import numpy as np

    np.save(tmp_path / "x.npy", np.full((20, 784), 0.5, np.float32))
    result = subprocess.run(["vae-engine", "encode", "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "z.npy"),
                             "--ray", "local", "--precision", "fp32"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert np.load(tmp_path / "z.npy").shape == (20, 50)


def test_versions_from_dist_info_names_equal_importlib_metadata():
    """`versions()` reads the dist-info folders' names (one listing per path entry); importlib.metadata is its
    twin, for every library it reports, installed or not."""
    import importlib.metadata as md

    from vae_engine.modeldir import configfile, versions

    got = versions()
    for name in ("torch", "numpy", "onnx", "onnxruntime", "numba", "openvino"):
        want = None
        for dist in configfile.ALIASES.get(name, (name,)):
            try:
                want = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
        assert got[name] == want, name
