"""The house's layers (docs/architecture.md): every import of the project's own modules, at the
top of a file or inside a function, goes from a layer to the same layer or one below it, and no
modules import each other in a circle."""
import ast

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
    """The most specific entry wins: src.utils.runfolder is 'runs', src.utils.errors 'ground'."""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            hit = module == n.rstrip("*") or (n.endswith("*") and module.startswith(n.rstrip("*")))
            if hit and len(n) > depth:
                best, depth = i, len(n)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def project_imports() -> dict:
    """{module: {imported project module}} from every .py under src/, top-level and inside functions."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for folder in ("src", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("src", "benchmarks")) \
                    and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in files else node.module)
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
    assert layer_of("src.utils.errors") > layer_of("src.distillation.cli")
    assert layer_of("src.utils.runfolder") < layer_of("src.utils.errors")  # the most specific entry wins
    assert layer_of("benchmarks.reproduce_takd") < layer_of("src.report")  # the applications sit on top
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
