"""The decisions and formats that do no I/O never import anything that does.

The sans-I/O core (the scheduler, the download machine, the picker, the announcement
schedule, the GC policy, the messages and codec, OCI routing, task identity) is driven by
the trio shells and by the simulation alike; an import of trio or a socket there would
tie it to one of them. Checked over the imports each module makes, transitively through
the project's own modules.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dragonfly"

SANS_IO = [
    "dragonfly/wire",
    "dragonfly/sched",
    "dragonfly/engine",
    "dragonfly/sim",
    "dragonfly/identity.py",
    "dragonfly/units.py",
    "dragonfly/redact.py",
    "dragonfly/storage/gc.py",
]
# Modules that do I/O, or whose import means an event loop, a socket or a database.
FORBIDDEN = {
    "anyio",
    "asyncio",
    "http.client",
    "hypercorn",
    "psycopg",
    "select",
    "selectors",
    "socket",
    "sqlite3",
    "sqlite_utils",
    "ssl",
    "starlette",
    "subprocess",
    "trio",
    "trio_websocket",
    "urllib.request",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@cache
def _imports(module: str) -> frozenset[str]:
    """Modules `module` imports (type-checking-only imports excluded)."""
    path = _path(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module or ""
                out.add(name)
                out.update(f"{name}.{alias.name}" for alias in node.names)
            for field in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return frozenset(out)


def _reach(module: str) -> dict[str, str]:
    """Every module `module` reaches through the project's modules: name -> who imports it."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name in seen:
                continue
            seen[name] = current
            if name.startswith("dragonfly.") and _path(name) is not None:
                todo.append(name)
    return seen


def _sans_io_modules() -> list[str]:
    out = []
    for entry in SANS_IO:
        path = ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out += [_module_name(f) for f in files]
    return out


@pytest.mark.parametrize("module", _sans_io_modules())
def test_no_io_in_the_core(module: str) -> None:
    reached = _reach(module)
    bad = sorted(
        f"{name} (imported by {reached[name]})"
        for name in reached
        if name in FORBIDDEN or name.split(".")[0] in FORBIDDEN
    )
    assert not bad, f"{module} reaches I/O: {', '.join(bad)}"


def test_the_core_list_names_real_modules() -> None:
    assert all((ROOT / entry).exists() for entry in SANS_IO)
    assert len(_sans_io_modules()) > 20
