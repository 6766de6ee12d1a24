"""The packages' import rules (see DESIGN.md, Layout): schemas imports nothing of ours, workers never imports the
job layer, an engine nor table storage (the jobs read and write tables, through `pipelines.io`), and no module
imports itself through others. Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "workers", "schemas")
ENGINES = ("apache_beam", "ray")
# Table storage: Delta tables and Arrow dataset scans. Workers may still read a file by URI (audio, weights).
STORAGE = ("deltalake", "pyarrow.dataset")


def _imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (ours by module name, others by top-level package)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[module] = targets
    return {
        module: {t for t in targets if t in graph or t.split(".")[0] not in PACKAGES} for module, targets in graph.items()
    }


def test_no_upward_imports_and_no_engine_in_workers():
    graph = _imports()
    for module, targets in graph.items():
        tops = {target.split(".")[0] for target in targets}
        if module.startswith("schemas"):
            assert not tops & set(PACKAGES) - {"schemas"}, module
        if module.startswith("workers"):
            assert not tops & {"pipelines", *ENGINES}, module


def test_workers_open_no_tables():
    # Probes once opened Delta tables themselves, without the store's storage options, schema checks and commit
    # retries.
    graph = _imports()
    storage = {
        module: sorted(t for t in targets if any(t == s or t.startswith(s + ".") for s in STORAGE))
        for module, targets in graph.items()
        if module.startswith("workers")
    }
    assert not {module: found for module, found in storage.items() if found}


def test_no_import_cycles():
    imports = _imports()
    graph = {module: {t for t in targets if t in imports} for module, targets in imports.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module not in done:
            for target in graph[module]:
                # A package imports its submodules' names from `package.module`; that is not a cycle through it.
                if not target.startswith(module + "."):
                    visit(target, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
