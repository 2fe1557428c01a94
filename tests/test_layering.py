"""The shared library (cmesh/) depends on no service built on it: routers, model
servers, the autoscaler, the simulator and the load tools import the library, never
the other way round. Entry points (the CLI package, `cmesh.up`) may import anything."""
from __future__ import annotations

import ast

from meshtest import REPO

SERVICES = ("router", "model_server", "autoscaler", "sim", "loadtest")
ENTRY_POINTS = ("cmesh/cli/", "cmesh/up.py")


def imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_no_service() -> None:
    offenders = {}
    for path in sorted((REPO / "cmesh").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(ENTRY_POINTS):
            continue
        bad = imported(path) & set(SERVICES)
        if bad:
            offenders[rel] = sorted(bad)
    assert offenders == {}
