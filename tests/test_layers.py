"""The house's layers (docs/architecture.md): every import of the project's own modules, at the
top of a file or inside a function, goes from a layer to the same layer or one below it, and no
modules import each other in a circle."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# From the top (what to run) down to the ground floor; a module may import its own layer and those below.
# The map lives in one place, docs/architecture.md's ```layers block.


def read_layers() -> list:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    return [(name.strip(), [m.strip() for m in mods.split(",")])
            for name, mods in (line.split(":", 1) for line in block.strip().splitlines())]


LAYERS = read_layers()


def layer_of(module: str) -> int:
    """The most specific entry wins: src.runs.runfolder is 'runs', src.utils.errors 'ground'."""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            hit = module == n.rstrip("*") or (n.endswith("*") and module.startswith(n.rstrip("*")))
            if hit and len(n) > depth:
                best, depth = i, len(n)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def absolute(name: str, path, node: ast.ImportFrom) -> str:
    """The module an import names, a relative one (`from ..utils import x` inside src) resolved."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def project_imports() -> dict:
    """{module: {imported project module}} from every .py under src/, top-level and inside functions."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for folder in ("src", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = absolute(name, path, node)
                if not module.startswith(("src", "benchmarks")):
                    continue
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    found.add(full if full in files else module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in files}
        edges[name] = {m for m in found if m in files and m != name}
    return edges


def test_no_import_runs_against_the_layers():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in project_imports().items() for b in targets if layer_of(b) < layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges = project_imports()
    # a package's __init__ importing its own submodules is how a package is built, not a circle
    edges = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_checks_see_an_upward_import(tmp_path):
    """The layer map does put the CLI above the ground: an import from src.utils of the CLI would be caught."""
    assert layer_of("src.utils.errors") > layer_of("src.experiment.cli")
    assert layer_of("src.runs.runfolder") < layer_of("src.utils.errors")  # the most specific entry wins
    assert layer_of("benchmarks.reproduce_takd") < layer_of("src.analysis.report")  # the applications sit on top
    edges = project_imports()
    assert "benchmarks.takd_tables" in edges["benchmarks.reproduce_takd"]  # benchmarks/ is read too
    assert [name for name, _ in LAYERS][:2] == ["applications", "experiment"] and len(LAYERS) == 8


def test_an_import_inside_a_function_says_why():
    """Imports sit at the top of a file; one inside a function (an optional package, a slow import
    only some paths need) carries a comment on its line or the line above saying why."""
    silent = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        lines = path.read_text().split("\n")
        functions = [f for f in ast.walk(ast.parse("\n".join(lines))) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in {n for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}:
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            if "#" not in here and not above.startswith("#") and not above.startswith(("import ", "from ")):
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not silent, "\n".join(sorted(silent))


def test_no_function_in_src_is_over_60_lines():
    """A long function reads as named phases instead: each phase its own function."""
    long = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)


def folder_of(module: str) -> str:
    """src.experiment.cli -> src.experiment; src.report (a module of src itself) -> src."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / Path(*parts)).is_dir() else parts[0]


def test_each_folder_is_one_layer_and_folders_import_downwards_without_a_circle():
    """The folders show the layers: every module of a folder sits in the folder's layer, and the
    folder-level import graph has no arrow running back up and no circle."""
    edges = project_imports()
    layers = {}
    for module in edges:
        layers.setdefault(folder_of(module), set()).add(LAYERS[layer_of(module)][0])
    mixed = {f: sorted(ls) for f, ls in layers.items() if len(ls) > 1}
    assert not mixed, f"folders holding several layers: {mixed}"
    folders = {}
    for a, targets in edges.items():
        for b in targets:
            fa, fb = folder_of(a), folder_of(b)
            if fa != fb and not (fa == "src" and fb.startswith("src.") and a == "src"):
                folders.setdefault(fa, set()).add(fb)
    order = {f: layer_of(f if f != "src" else "src") for f in layers}
    upward = [f"{a} -> {b}" for a, bs in folders.items() for b in bs if order.get(b, 99) < order[a]]
    assert not upward, "\n".join(upward)
    circles = []

    def visit(node, stack, state):
        state[node] = "open"
        for nxt in sorted(folders.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt], state)
        state[node] = "done"
    state = {}
    for node in sorted(folders):
        if node not in state:
            visit(node, [node], state)
    assert not circles, "\n".join(circles)


def test_the_package_imports_under_its_installed_name_from_anywhere(tmp_path):
    """`pip install -e .` maps the package name `takd` onto src/ (pyproject.toml); every import inside
    src/ is relative, so it imports under that name outside the repository (here: a link named takd
    in an empty folder, where `src` is not importable)."""
    def script_guarded(tree) -> set:  # `if __package__ in (None, ""): import src.utils` (a file run as a script)
        return {n.lineno for node in ast.walk(tree) if isinstance(node, ast.If) and "__package__" in ast.unparse(node.test)
                for n in ast.walk(node) if hasattr(n, "lineno")}
    absolute_imports = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in sorted((ROOT / "src").rglob("*.py"))
                        for tree in [ast.parse(p.read_text())] for guarded in [script_guarded(tree)]
                        for node in ast.walk(tree) if getattr(node, "lineno", None) not in guarded
                        if (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "src")
                        or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "src" for a in node.names))]
    assert not absolute_imports, "\n".join(absolute_imports)
    assert 'takd = "src"' in (ROOT / "pyproject.toml").read_text()
    (tmp_path / "takd").symlink_to(ROOT / "src")
    code = ("import importlib, sys; from takd import load_model; "
            "[importlib.import_module(m) for m in ('takd.experiment.session', 'takd.analysis.report', 'takd.evaluate')]; "
            "assert 'src' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pyproject_lists_every_package_of_src():
    """The installed `takd` holds every package folder of src/ (a new folder missing from the list
    would be left out of `pip install -e .` silently)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("takd",) + p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert listed == folders, f"missing: {sorted(folders - listed)}; extra: {sorted(listed - folders)}"
