"""The packages' import rules (see DESIGN.md, Layout): schemas imports nothing of ours, workers never imports the
job layer, an engine nor table storage (the jobs read and write tables, through `catalog_embed.pipelines.io`), and no module
imports itself through others. Read from the source, imports inside functions included; every module is ours only
under `catalog_embed.` (the folders are mapped there by pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "workers", "schemas")
NAMESPACE = "catalog_embed"
ENGINES = ("apache_beam", "ray")
# Table storage: Delta tables and Arrow dataset scans. Workers may still read a file by URI (audio, weights).
STORAGE = ("deltalake", "pyarrow.dataset")


def _imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (ours by module name, others by top-level package)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            module = f"{NAMESPACE}.{module}"
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            graph[module] = targets
    return {module: {t for t in targets if t in graph or not _ours(t)} for module, targets in graph.items()}


def _ours(module: str) -> bool:
    return module.split(".")[0] in (NAMESPACE, *PACKAGES)


def _package(module: str) -> str:
    """`catalog_embed.workers.shard` -> `workers`; another distribution's module -> its top-level name."""
    parts = module.split(".")
    return parts[1] if parts[0] == NAMESPACE and len(parts) > 1 else parts[0]


def test_every_import_of_ours_goes_through_the_namespace():
    # A bare `import pipelines` works in the checkout (the folder is on sys.path) and fails where the wheel is
    # installed: the installed package is `catalog_embed.pipelines`.
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                assert not [n for n in names if n.split(".")[0] in PACKAGES], path


def test_no_upward_imports_and_no_engine_in_workers():
    graph = _imports()
    for module, targets in graph.items():
        tops = {_package(target) for target in targets}
        if _package(module) == "schemas":
            assert not tops & set(PACKAGES) - {"schemas"}, module
        if _package(module) == "workers":
            assert not tops & {"pipelines", *ENGINES}, module


def test_workers_open_no_tables():
    # Probes once opened Delta tables themselves, without the store's storage options, schema checks and commit
    # retries.
    graph = _imports()
    storage = {
        module: sorted(t for t in targets if any(t == s or t.startswith(s + ".") for s in STORAGE))
        for module, targets in graph.items()
        if _package(module) == "workers"
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
