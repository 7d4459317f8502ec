"""How the code is laid out, as contracts: commands parse and call, the library under them has no import cycle, no
module reaches into another's private names, and nothing the package ships names a path on the developer's disk."""

import ast
import re
import sys
from pathlib import Path

from ssvit.cli import COMMANDS

from conftest import ROOT

PACKAGE = {"ssvit": ROOT / "ssvit", "ssvit.objectives": ROOT / "objectives"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path, name: str) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement of a module, at the top or inside a function, with relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = name.rsplit(".", node.level - (path.stem == "__init__"))[0]
            node.module = f"{base}.{node.module}" if node.module else base
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
    return found


def edges() -> dict[str, set[str]]:
    """module -> the ssvit modules it imports (`from ssvit import objectives` counts as ssvit.objectives)."""
    known, graph = modules(), {}
    for name, path in known.items():
        targets = set()
        for node in imports(path, name):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in known}
            elif node.module in known or node.module == "ssvit":
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
        graph[name] = targets & set(known) - {name, "ssvit"}
    return graph


def test_no_import_cycle():
    """Including imports inside functions: a lazy import that closes a cycle is still a cycle (config and models
    imported each other so)."""
    graph, state, cycles = edges(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_command_imports_another():
    """Commands parse and call; what two of them share lives in the library (config, data, models, train...)."""
    graph = edges()
    commands = {f"ssvit.{c}" for c in COMMANDS}
    assert commands <= set(graph)
    for command in commands:
        assert not graph[command] & commands, (command, graph[command] & commands)


def test_no_private_name_is_imported_across_modules():
    for name, path in modules().items():
        for node in imports(path, name):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssvit"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"


def test_nothing_shipped_names_the_developers_shared_folder():
    """Presets and library code name data as a user has it; ../shared is for tests and docs examples only."""
    shipped = [*(ROOT / "ssvit").glob("*.py"), *(ROOT / "objectives").glob("*.py"), *(ROOT / "configs").glob("*.yaml")]
    assert len(shipped) > 30
    assert [p.name for p in shipped if "../shared" in p.read_text() or "shared/data" in p.read_text()] == []


def test_no_module_of_ssvit_shadows_the_standard_library():
    """`accelerate launch ssvit/pretrain.py` puts ssvit/ first on sys.path: a module there named like a
    standard-library one (inspect.py once) would replace it for every import."""
    names = {p.stem for p in (ROOT / "ssvit").glob("*.py")} - {"__init__", "__main__"}
    assert not names & set(sys.stdlib_module_names)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_a_docs_heading_holds_only_its_title():
    """A code block pasted onto a heading's line renders as one long heading and hides the commands."""
    fused = [f"{p.name}: {line[:60]}" for p in pages() for line in p.read_text().splitlines()
             if re.match(r"#+ ", line) and re.search(r"\S {4,}\S", line)]  # fmt: skip
    assert fused == []


def test_every_relative_link_and_image_of_the_docs_exists():
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert len(pages()) > 5 and broken == []


def test_every_docs_table_has_a_header_separator_and_rows_of_its_width():
    """A table cut short (a header with no separator, a row with a missing cell) renders as stray text."""
    broken = []
    for page in pages():
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
                continue  # not the first line of a table
            table = lines[i : i + next((k for k, row in enumerate(lines[i:]) if not row.startswith("|")), len(lines) - i)]
            width = table[0].count("|")
            if len(table) < 2 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]) or any(r.count("|") != width for r in table):
                broken.append(f"{page.name}:{i + 1}: {line[:50]}")
    assert broken == []
