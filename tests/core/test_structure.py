"""The package's structure: no import cycles among the modules of hnet/ and data/ (imports inside
functions count too), imports run one way between the two (hnet uses data/ to prepare corpora;
data/ never imports hnet), and the parts of hnet import each other only downwards:

    part         may import (besides itself)
    core         nothing else (core = the modules at the top of hnet/, and hnet/layers/)
    parallel     core
    io           core, parallel
    training     core, parallel, io
    inference    core, parallel, io            (never training)
    evaluation   core, parallel, io, inference
    perf         anything

Each subpackage's __init__.py states its row.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("hnet", "data")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of hnet/ and data/ it imports (anywhere in the file)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from hnet.parallel import sharding` imports the module hnet.parallel.sharding.
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            imported |= {t for t in targets if t in modules and t != name}
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, then "done"
    path: list[str] = []

    def visit(node):
        state[node], _ = "open", path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "hnet.model" in graph["hnet.training.train_step"]  # the walk sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_never_imports_hnet():
    graph = import_graph()
    offenders = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if m.startswith("data") for t in targets if t.startswith("hnet")
    )
    assert not offenders, offenders


# The table of the module docstring: part -> the parts it may import.
ALLOWED_IMPORTS = {
    "core": {"core"},
    "parallel": {"core", "parallel"},
    "io": {"core", "parallel", "io"},
    "training": {"core", "parallel", "io", "training"},
    "inference": {"core", "parallel", "io", "inference"},
    "evaluation": {"core", "parallel", "io", "inference", "evaluation"},
    "perf": {"core", "parallel", "io", "training", "inference", "evaluation", "perf"},
}


def part_of(module: str) -> str:
    """ "hnet.training.train_step" -> "training"; "hnet.model", "hnet.layers.attention" -> "core"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED_IMPORTS else "core"


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports between modules of hnet that the table does not allow, as "a -> b" lines."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("hnet")
        for target in targets
        if target.startswith("hnet") and part_of(target) not in ALLOWED_IMPORTS[part_of(module)]
    )


def test_parts_import_only_downwards():
    graph = import_graph()
    # The walk sees the imports that cross parts (so an empty answer below means something).
    assert "hnet.io.tokenizer" in graph["hnet.inference.load"]
    assert "hnet.parallel.sharding" in graph["hnet.training.train_step"]
    assert "hnet.logical_axes" in graph["hnet.layers.attention"]
    assert {part_of(m) for m in graph if m.startswith("hnet")} == set(ALLOWED_IMPORTS)
    offenders = forbidden_imports(graph)
    assert not offenders, "imports against the table in tests/core/test_structure.py: " + ", ".join(offenders)


def test_forbidden_imports_finds_one():
    assert forbidden_imports({"hnet.inference.decode": {"hnet.training.train_step", "hnet.model"}}) == [
        "hnet.inference.decode -> hnet.training.train_step"
    ]
    assert forbidden_imports({"hnet.model": {"hnet.parallel.sharding"}}) == ["hnet.model -> hnet.parallel.sharding"]
    assert forbidden_imports({"hnet.perf.bench": {"hnet.training.train_step"}}) == []
