"""The layout's rules, checked from the source's import graph and in a fresh interpreter.

Inside ``engine/`` the folders say which process runs the code: ``client/`` (the API-server
process's handle on the core) imports neither ``core/`` nor ``worker/``; ``worker/`` never
imports ``core/``; ``core/`` never imports ``client/``; the HTTP server (``server/``) runs
beside the client and imports no device code. Kernels never import the engine, the engine
never imports the operator, the operator never imports torch or the engine. Imports inside
a package are relative, so each leads a reader (and a tool) to a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "engine": "metroline.engine",
    "kernels": "metroline.kernels",
    "operator": "metroline.operator",
}
#: Production code: what the size and duplication rules cover.
PRODUCTION = ("engine", "kernels", "operator", "benchmarks")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [*PACKAGES[folder].split("."), *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module this file imports (at any depth, except ``if TYPE_CHECKING:`` blocks),
    resolved to absolute names, with the import's ``level`` (0: absolute)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.level))
            # ``from pkg import submodule`` imports the submodule too.
            found.extend((f"{target}.{alias.name}", node.level) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    sources = {_module_name(p): p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        for target, _level in _imports(path):
            graph[module].add(target)
    return graph


GRAPH = _graph()


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


FORBIDDEN = [
    ("metroline.engine.client", ("metroline.engine.core", "metroline.engine.worker")),
    ("metroline.engine.server", ("metroline.engine.core", "metroline.engine.worker")),
    (
        "metroline.engine.server",
        ("metroline.engine.layers", "metroline.engine.models", "metroline.kernels"),
    ),
    ("metroline.engine.client", ("metroline.engine.layers", "metroline.kernels")),
    ("metroline.engine.worker", ("metroline.engine.core", "metroline.engine.client")),
    ("metroline.engine.core", ("metroline.engine.client", "metroline.engine.server")),
    ("metroline.kernels", ("metroline.engine", "metroline.operator")),
    ("metroline.engine", ("metroline.operator",)),
    ("metroline.operator", ("torch", "triton", "metroline.engine", "metroline.kernels")),
]


@pytest.mark.parametrize(("source", "forbidden"), FORBIDDEN, ids=lambda v: str(v))
def test_import_rules(source, forbidden):
    broken = {}
    for module in GRAPH:
        if not _within(module, source):
            continue
        # Transitively, through every module imported on the way.
        bad = sorted(t for t in _reachable(module) if any(_within(t, f) for f in forbidden))
        if bad:
            broken[module] = bad
    assert not broken, f"{source} must not import {forbidden}: {broken}"


def test_imports_inside_a_package_are_relative():
    absolute = []
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            for target, level in _imports(path):
                if level == 0 and _within(target, package):
                    absolute.append(f"{path.relative_to(ROOT)}: {target}")
    assert not absolute, absolute


def test_no_file_is_longer_than_the_limit():
    long = []
    for folder in (*PRODUCTION, "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = path.read_text().count("\n")
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert not long, long


#: Folders whose scripts put themselves first on ``sys.path`` (as do tests that import them).
SCRIPT_FOLDERS = ("benchmarks", "tests/gpu")
#: Optional packages that libraries probe for by name (``importlib.util.find_spec``): a
#: script of such a name on ``sys.path`` passes for the package. ``benchmarks/kernels.py``
#: once did so for Hugging Face's ``kernels``, which transformers then imported and failed on.
PROBED_PACKAGES = {"kernels", "flash_attn", "deepspeed", "apex", "bitsandbytes", "accelerate",
                   "peft", "optimum", "liger_kernel", "xformers", "vllm", "sglang"}  # fmt: skip


def test_no_script_shadows_a_package():
    """A script's module name is neither a probed optional package nor a module importable
    from outside the repository (the standard library, an installed package)."""
    import importlib.machinery

    outside = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(ROOT)]
    clashes = []
    for folder in SCRIPT_FOLDERS:
        for path in (ROOT / folder).glob("*.py"):
            name = path.stem
            found = importlib.machinery.PathFinder.find_spec(name, outside)
            if name in PROBED_PACKAGES or found is not None or name in sys.builtin_module_names:
                clashes.append(f"{path.relative_to(ROOT)}")
    assert not clashes, clashes


def _body_key(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    # One-statement accessors (``return self.finish_reason is not None``) may repeat.
    if not body or (len(body) == 1 and sum(1 for _ in ast.walk(body[0])) < 12):
        return None
    return "\n".join(ast.dump(statement) for statement in body)


def test_no_two_production_functions_have_the_same_body():
    bodies = defaultdict(list)
    for folder in PRODUCTION:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    key = _body_key(node)
                    if key is not None:
                        bodies[key].append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    repeated = [places for places in bodies.values() if len(places) > 1]
    assert not repeated, repeated


def test_the_api_server_process_loads_no_device_code(tiny_checkpoint):
    """Import the server app and start a client (which spawns the engine core): the API
    server's own process holds no kernel, core or worker module."""
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from metroline.engine.server.app import build_app
        from metroline.engine.client.async_llm import AsyncLLM
        from metroline.engine.checkpoint import load_tokenizer
        from metroline.engine.config import EngineArgs

        async def main():
            config = EngineArgs(model={str(tiny_checkpoint("llama"))!r}, device="cpu",
                                kv_cache_memory_bytes=2**22).create_config()
            engine = AsyncLLM(config, load_tokenizer(config.model.path))
            await engine.start()
            await engine.shutdown()

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith(
            ("metroline.kernels", "metroline.engine.core", "metroline.engine.worker",
             "metroline.engine.layers", "metroline.engine.models", "triton")))
        print("LOADED", loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
