"""The layout of engine/ by layer (docs/architecture.md, "Layout"): no import runs from a lower layer to a higher
one, the engine never imports its test support or the benchmarks, and nothing imports ``bench``.

Every import counts, including the ones inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What each package of engine/ may import from the engine (besides itself). engine.cli is the top: it may import
# every layer except the test support.
ALLOWED: dict[str, set[str]] = {
    "engine.core": set(),
    "engine.store": {"engine.core"},
    "engine.ingest": {"engine.core", "engine.store"},
    # correlate is pure: the ground layer and the network identity only (no producer, no input parsing, no store)
    "engine.correlate": {"engine.core", "engine.ingest.network_identity"},
    "engine.runtime": {"engine.core", "engine.store", "engine.ingest", "engine.correlate"},
    # the story feed reads what the engine stored: the store's interface and the story body's declaration
    "engine.feed": {"engine.core", "engine.store", "engine.correlate"},
    "engine.tools": {"engine.core", "engine.store", "engine.ingest", "engine.correlate", "engine.runtime"},
    # ECS and OCSF mappings of a story body: pure, the body's declaration and the errors only (no store, no driver)
    "engine.export": {"engine.core", "engine.correlate"},
    "engine.cli": {"engine", "engine.core", "engine.store", "engine.ingest", "engine.correlate", "engine.runtime"}
    | {"engine.tools", "engine.feed", "engine.export"},
    "engine.testing": {"engine.core", "engine.store", "engine.ingest", "engine.correlate", "engine.runtime"}
    | {"engine.tools"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; relative imports resolved."""
    module = _module(path)
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from engine.x import y` may import the module engine.x.y: count both forms
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def _covered(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def test_every_engine_package_has_a_rule() -> None:
    packages = {_package(_module(p)) for p in (ROOT / "engine").rglob("*.py")} - {"engine"}
    missing = packages - set(ALLOWED)
    assert not missing, f"a new package needs a rule here and a paragraph in docs/architecture.md: {missing}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        module = _module(path)
        package = _package(module)
        if package == "engine":
            continue  # engine/__init__.py: the version only
        allowed = ALLOWED[package] | {package}
        for line, target in _imports(path):
            if not (target == "engine" or target.startswith(("engine.", "bench", "tests"))):
                continue
            if not _is_module(target) and target != "engine":
                continue  # `from engine.x import name`: the name is not a module; engine.x itself is checked
            if not _covered(target, allowed):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    assert offenders == []


def test_nothing_imports_bench_and_the_engine_never_imports_its_test_support() -> None:
    offenders = []
    for top in ("engine", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for line, target in _imports(path):
                if target == "bench" or target.startswith("bench."):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
                in_testing = _package(_module(path)) == "engine.testing"
                if top == "engine" and not in_testing and target.startswith("engine.testing"):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: the engine imports {target}")
    assert offenders == []


def test_the_checker_sees_a_violation() -> None:
    """The graph check is not vacuous: a planted upward import (core → runtime, lazy) is found."""
    source = "def f() -> None:\n    from engine.runtime.worker import Worker\n"
    tree = ast.parse(source)
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["engine.runtime.worker"]
    assert not _covered("engine.runtime.worker", ALLOWED["engine.core"] | {"engine.core"})
    assert _covered("engine.core.event", ALLOWED["engine.correlate"])
    assert not _covered("engine.ingest.producer", ALLOWED["engine.correlate"])
