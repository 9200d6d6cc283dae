"""The layer rule of DESIGN.md, checked on dq's source: who may import whom, no cycles, few lazy imports."""

import ast
from collections import defaultdict
from pathlib import Path

import dq

ROOT = Path(dq.__file__).parent
# Modules every part may use: errors, the registry helper, atomic files, byte counts.
FOUNDATION = {"errors", "registry", "io", "sizes"}
CORE = {"quant", "nn", "kernels", "calib"}
ADAPTERS = {"pipelines", "reference", "evaluation", "app", "commands", "cli", "__main__"}
# What each part may import besides the foundation (DESIGN.md: each arrow points down the list).
ALLOWED = {
    "quant": set(),
    "kernels": {"quant"},
    "nn": {"quant", "kernels"},
    "calib": {"quant", "kernels", "nn"},
    "cache": {"nn"},
    "recipes": {"quant", "calib"},
    "metrics": set(),
}
MAX_FUNCTION_LEVEL_IMPORTS = 12


def _module_name(path: Path) -> str:
    parts = ["dq", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(module: str, path: Path):
    """(target module, line, inside a function, line text) of each dq import outside `if TYPE_CHECKING`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        in_function, type_checking = False, False
        up = parents.get(node)
        while up is not None:
            in_function |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
            type_checking |= isinstance(up, ast.If) and "TYPE_CHECKING" in ast.unparse(up.test)
            up = parents.get(up)
        if type_checking:
            continue
        for target in targets:
            if target == "dq" or target.startswith("dq."):
                yield target, node.lineno, in_function, lines[node.lineno - 1]


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "dq"


EDGES = [(m, t, line, lazy, text) for m, p in MODULES.items() for t, line, lazy, text in _imports(m, p)]


def test_core_never_imports_adapters():
    bad = [f"{m}:{line} imports {t}" for m, t, line, _, _ in EDGES if _part(m) in CORE and _part(t) in ADAPTERS | {"dq", "cache", "metrics"}]
    assert not bad, "the core (quant, nn, kernels, calib) must not import adapters:\n" + "\n".join(bad)


def test_each_part_imports_only_what_lies_below_it():
    bad = [
        f"{m}:{line} ({_part(m)}) imports {t} ({_part(t)})"
        for m, t, line, _, _ in EDGES
        if _part(m) in ALLOWED and _part(t) != _part(m) and _part(t) not in ALLOWED[_part(m)] | FOUNDATION
    ]
    assert not bad, "imports against the layer order of DESIGN.md:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for m, t, _, lazy, _ in EDGES:
        target = t if t in MODULES else t.rpartition(".")[0]
        if not lazy and target != m and target in MODULES:
            graph[m].add(target)
    done, path, cycles = set(), [], []

    def visit(m):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(MODULES):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_are_few_and_say_why():
    lazy = [(m, line, text.strip()) for m, _, line, is_lazy, text in EDGES if is_lazy]
    unexplained = [f"{m}:{line}: {text}" for m, line, text in lazy if "#" not in text]
    assert not unexplained, "a function-level dq import needs a one-line reason (a trailing comment):\n" + "\n".join(unexplained)
    assert len(lazy) <= MAX_FUNCTION_LEVEL_IMPORTS, f"{len(lazy)} function-level dq imports: " + ", ".join(f"{m}:{line}" for m, line, _ in lazy)
