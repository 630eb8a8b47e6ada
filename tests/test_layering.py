"""The layering contract of ARCHITECTURE.md, checked on the source: each sub-package of vae_engine imports only
from itself and the packages before it in LAYERS, and no module takes part in an import cycle. Every import
counts, those inside functions included (a function-level import hides a cycle, it does not remove it); only
imports under `if TYPE_CHECKING:` are left out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import vae_engine

ROOT = Path(vae_engine.__file__).parent
# the order data moves: a package may import from the ones before it, never from the ones after it
LAYERS = ("core", "data", "model", "modeldir", "perf", "training", "runtime", "export", "anomaly", "jobs", "serving",
          "cli")


def module_name(path: Path) -> str:
    parts = ("vae_engine", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, modules: set[str]) -> set[str]:
    """The vae_engine modules a file imports (a `from package import name` counts the sub-module `name` when
    there is one, else the package)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("vae_engine"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vae_engine")}
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"shipped"}
    assert packages == set(LAYERS), "add the new package to LAYERS (and ARCHITECTURE.md) at its place in the flow"


def test_packages_import_only_from_earlier_layers():
    upward = []
    for module, targets in graph().items():
        here = layer(module)
        if here is None:  # vae_engine/__init__.py and __main__.py: the public face, above every layer
            continue
        for target in targets:
            there = layer(target)
            if there is None or LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def _cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    deps = graph()
    # a package's __init__ re-exporting its own modules is not a cycle of concepts: leave those edges out
    deps = {m: {t for t in ts if not (m.startswith(t + ".") and t in deps)} for m, ts in deps.items()}
    assert not _cycles(deps)


def test_the_checker_sees_cycles_and_upward_imports():
    """The contract test itself can fail: a planted cycle and an upward import are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert layer("vae_engine.core.errors") == "core" and layer("vae_engine") is None
    assert LAYERS.index(layer("vae_engine.cli.commands")) > LAYERS.index(layer("vae_engine.runtime.engine"))


def test_the_public_names_import():
    """The package's public names and modules (`__all__`, the sub-packages' re-exports) import and are the objects
    at their homes."""
    import importlib

    from vae_engine import Engine, VAEOutlierDetector, data, jobs, ray_jobs  # noqa: F401
    from vae_engine.export import export
    from vae_engine.model import VAE, elbo, iwae_bound

    assert ray_jobs is importlib.import_module("vae_engine.jobs.ray_jobs")
    assert all(getattr(vae_engine, name) is not None for name in vae_engine.__all__)
    assert callable(export) and callable(jobs.stream) and callable(data.load_split) and callable(elbo)
    assert VAE.__module__ == "vae_engine.model.networks" and iwae_bound.__module__ == "vae_engine.model.estimators"
