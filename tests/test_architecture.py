"""The package's layering: no import cycle among `merge_distill`'s modules, counting the imports inside functions
(deferred imports hide cycles, they do not remove them); imports under `if TYPE_CHECKING:` alone are exempt."""

import ast
from pathlib import Path

import merge_distill

ROOT = Path(merge_distill.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The `merge_distill` modules `path` imports anywhere (function bodies too), but under `if TYPE_CHECKING:`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & known  # `from package import submodule`
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name defined in the module (or package `__init__`) itself
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, set(known)) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def without_root(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`from merge_distill import x` names the top package, whose `__init__` imports nothing: not an edge."""
    return {m: deps - {"merge_distill"} for m, deps in graph.items()}


def test_no_import_cycle_counting_imports_inside_functions():
    found = cycles(without_root(import_graph()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_deferred_cycle(tmp_path):
    """The walk sees an import inside a function, and not one under TYPE_CHECKING."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from merge_distill import b\n")
    b = tmp_path / "b.py"
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from merge_distill import a\n")
    known = {"merge_distill.a", "merge_distill.b"}
    assert imports(a, "merge_distill.a", known) == {"merge_distill.b"}
    assert imports(b, "merge_distill.b", known) == set()
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


def test_the_top_package_imports_nothing():
    assert import_graph()["merge_distill"] == set()


METHOD_MAY_IMPORT = {"merge_distill.objective", "merge_distill.dense", "merge_distill.step_metrics",
                     "merge_distill.batch", "merge_distill.errors"}


def test_methods_are_functions_of_tensors():
    """A method file imports the math (objective, dense), the metric values and other methods, never the trainer,
    the engines, the models or the ranks (`merge_distill.methods.base` says why)."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("merge_distill.methods"):
            other = {d for d in deps if not d.startswith("merge_distill.methods")} - METHOD_MAY_IMPORT
            assert not other, f"{name} imports {sorted(other)}"


# docs/architecture.md's layers: a module imports only from its own layer or the ones before it
LAYERS = {
    1: ("errors", "io", "recipe", "objective", "step_metrics", "provenance"),
    2: ("sampling", "scoring", "fused", "dense", "data", "batch"),
    3: ("methods",),
    4: ("models", "adapters", "distributed", "parallel", "frozen", "engines", "paged", "backends", "merging", "checkpoint",
        "closed_form", "fetch"),
    5: ("train",),
    6: ("build", "validate", "plan", "shapes", "evaluation", "graders", "sandbox", "run", "sweep", "extensions",
        "tracking"),
    7: ("cli", "__main__"),
    8: ("toyworld",),
}
LAYER_OF = {top: n for n, tops in LAYERS.items() for top in tops}


def test_each_module_imports_only_its_own_layer_or_the_ones_before():
    graph = without_root(import_graph())
    unplaced = sorted(m for m in graph if m != "merge_distill" and m.split(".")[1] not in LAYER_OF)
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"
    upward = [f"{m} -> {d}" for m, deps in graph.items() if m != "merge_distill" for d in deps
              if LAYER_OF[d.split(".")[1]] > LAYER_OF[m.split(".")[1]]]
    assert not upward, f"imports of a later layer: {upward}"
