"""The shape of the package: no import cycles, every module in README's layout table, no outside references.

A newcomer finds a rule by reading README's layout table and the module it
names; these tests keep that map true.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipal"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__"))


def imported_modules(module: str) -> set[str]:
    """clipal modules that ``module`` imports anywhere (at the top or inside a function)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("clipal."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("clipal."))
    return found & set(MODULES)


def test_no_import_cycle_among_clipals_modules():
    graph = {module: imported_modules(module) for module in MODULES}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module])
        visiting.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_the_pure_core_does_no_io():
    # Classification, the credential rule and configuration parsing know nothing of sockets or Flask.
    for module in ("classify", "outbound", "clients"):
        source = (PACKAGE / f"{module}.py").read_text()
        assert not re.search(r"^\s*(import|from)\s+(gevent|requests|urllib3|flask|socket)\b", source, re.M), module


def test_readme_layout_tables_list_every_module():
    for readme in ("README.md", "README.zh-CN.md"):
        text = (ROOT / readme).read_text()
        listed = set(re.findall(r"^  (\w+)\.py\s", text, re.M))
        assert listed == set(MODULES), f"{readme}: missing {set(MODULES) - listed}, extra {listed - set(MODULES)}"


def test_code_comments_never_cite_a_document_outside_the_repository():
    for path in PACKAGE.glob("*.py"):
        assert not re.search(r"SPEC|§\d", path.read_text().replace("RFC 9110 §", "")), path.name
