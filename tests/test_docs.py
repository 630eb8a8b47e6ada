"""The documentation: the CLI reference is the commands' own text (regenerated and compared), every relative link
of the README, ARCHITECTURE and the docs pages resolves to a file of the repository (and an anchor to a heading
of it), every code block marked runnable runs, and the site builds with `mkdocs build --strict` where mkdocs is
installed (the dev extra)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import chromium, chromium_page

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub and mkdocs make them."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_cli_reference_is_the_commands_own_text():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_cli
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "reference" / "cli.md").read_text() == gen_cli.render(), \
        "docs/reference/cli.md is stale: run `python docs/gen_cli.py`"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        assert dest.is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target} leaves the repository"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: no heading for #{anchor} in {dest.name}"


def test_every_page_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the dev extra)")
def test_site_builds_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "log_likelihood" in api and "VAEOutlierDetector" in api  # the API page is generated from docstrings


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or chromium() is None,
                    reason="needs mkdocs (the dev extra) and chromium (.ci/run installs it)")
def test_built_site_renders_in_chromium(tmp_path):
    """The home page and the CLI reference of the built site, opened in headless Chromium: their titles, the
    navigation a reader follows from home to each guide, and screenshots that are not blank."""
    import functools
    import http.server
    import threading

    pytest.importorskip("playwright.sync_api")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no line per request in the test's output
            pass

    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with chromium_page() as (page, errors):
            page.goto(url + "/")
            assert "vae-engine" in page.title()
            text = page.inner_text("body")
            for guide in ("Data", "Training", "Precision", "Serving", "Anomaly detection", "Scaling out"):
                assert guide in text, guide  # one click from home to each how-to guide
            page.screenshot(path=str(tmp_path / "home.png"), full_page=True)
            page.goto(url + "/reference/cli/")
            assert "vae-engine serve" in page.inner_text("body") and "--max-work" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "cli.png"))
        assert not errors, errors
        for shot in ("home.png", "cli.png"):
            assert (tmp_path / shot).stat().st_size > 20_000, shot  # a rendered page, not a blank one
    finally:
        httpd.shutdown()


RUNNABLE = ("<!-- runnable", "<!-- .ci/run runs this example")  # the comment line right before a code block


def runnable_blocks() -> list[tuple[str, str, str]]:
    """(page:line, language, code) of every block marked runnable in the README and the docs."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            fence = lines[i + 1]
            if line.startswith(RUNNABLE) and fence.startswith("```") and fence[3:] in ("bash", "python"):
                end = lines.index("```", i + 2)
                out.append((f"{page.relative_to(ROOT)}:{i + 2}", fence[3:], "\n".join(lines[i + 2:end]) + "\n"))
    return out


def test_runnable_blocks_are_marked():
    """The README's tour and Python example, the data and anomaly-detection guides at least."""
    where = {name.split(":")[0] for name, _, _ in runnable_blocks()}
    assert {"README.md", "docs/guides/data.md", "docs/guides/anomaly-detection.md"} <= where


@pytest.mark.slow
@pytest.mark.parametrize("name,language,code", runnable_blocks(), ids=[b[0] for b in runnable_blocks()])
def test_runnable_block_runs(name, language, code, tmp_path):
    """Each block as a user runs it, in a fresh folder (where `vae_engine/assets` points into this checkout, so
    the README's paths to the bundled data resolve); bash blocks with `set -e` and pipefail."""
    (tmp_path / "vae_engine").symlink_to(ROOT / "vae_engine")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + ":" + os.environ.get("PATH", ""),
           "VAE_ENGINE_CACHE": str(tmp_path / "cache")}
    args = ["bash", "-e", "-o", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def _bench_table(report: dict) -> str:
    pytest.importorskip("torch")
    from vae_engine.runtime import bench

    return bench.markdown(report)


def _jobs_table(report: dict) -> str:
    from bench import jobs_bench

    return jobs_bench.markdown(report)


def _import_table(report: dict) -> str:
    from bench import import_bench

    return import_bench.markdown(report)


@pytest.mark.parametrize("page,name,data,render", [
    ("docs/benchmarks/backends.md", "bench-table", "bench/results/bench.json", _bench_table),
    ("docs/benchmarks/jobs.md", "jobs-table", "bench/results/jobs.json", _jobs_table),
    ("docs/benchmarks/imported.md", "import-table-256", "bench/results/import_bench.json", _import_table),
    ("docs/benchmarks/imported.md", "import-table-512", "bench/results/import_bench_512.json", _import_table),
])
def test_measurement_tables_are_generated_from_their_json(page, name, data, render):
    """A measurement page's table is its benchmark's JSON rendered (`perf.pages`): it cannot drift from the data,
    and it names the run's machine, versions, date and command."""
    import json

    from vae_engine.perf import pages

    got = pages.section(ROOT / page, name)
    assert got is not None, f"{page} has no {name} section"
    want = render(json.loads((ROOT / data).read_text())).rstrip("\n") + "\n"
    assert got == want, f"{page}: regenerate with the command on the page"
    assert "Machine:" in got and "2026-" in got


def test_charts_are_drawn_from_their_json(tmp_path):
    """bench/charts.py draws the docs' load and detector charts from the committed JSON (a PNG each)."""
    pytest.importorskip("matplotlib")
    from bench import charts

    for path in charts.draw(out=tmp_path):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (ROOT / "bench" / "results" / path.name).is_file()  # the chart the docs show is committed
