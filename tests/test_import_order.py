"""Imports run one way, down the data flow: cli -> api -> the stages -> storage, config, exceptions.

`LAYERS` is the one ranked list of kfold_ray's packages, lowest first. A module may import its
own package and anything on a lower layer; packages that share a layer are independent of each
other. Every import counts: module-level, inside functions, and under ``TYPE_CHECKING`` (a type
hint that points up the flow is a dependency all the same). No circle, at any level: not even
between two modules of one package. A new package must be given its place here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "kfold_ray"

LAYERS: list[tuple[str, ...]] = [
    ("kfold_ray._version", "kfold_ray._exceptions"),
    ("kfold_ray._config",),
    ("kfold_ray.storage",),  # the run's storage over pyarrow.fs, locations, the run-dir layout
    ("kfold_ray._node",),  # what this node has: torch, CUDA, driver, GPUs, Detectron2's build
    ("kfold_ray.data.validate",),
    ("kfold_ray.data",),  # the dataset, its fold plan, the built-in example
    ("kfold_ray._backend", "kfold_ray._schema"),  # contracts between the stages
    # the backend that trains and predicts a fold; the cluster (join, sizing, node checks)
    ("kfold_ray.detectron2", "kfold_ray.cluster"),
    ("kfold_ray.run",),  # driver, fold actors, Ray Train workers, the reducer
    ("kfold_ray.outputs",),
    ("kfold_ray.report",),
    ("kfold_ray.review",),  # export for review in other tools, and applying the fixes
    ("kfold_ray._result",),  # a finished run: CVResult, open_run, its rankings, report_run
    ("kfold_ray._api",),
    ("kfold_ray._cli",),
    ("kfold_ray",),  # __init__: the public API
]
# The CLI parses flags and prints: all it runs goes through the Python API.
ONLY = {"kfold_ray._cli": {"kfold_ray._api", "kfold_ray._config", "kfold_ray._exceptions",
                           "kfold_ray._version"}}


# ---- reading the imports --------------------------------------------------------------------
def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool, modules: set[str]) -> set[str]:
    """Every kfold_ray module that ``source`` (the text of ``module``) imports, wherever it
    does: ``from pkg import name`` counts as ``pkg.name`` when that is a module, else ``pkg``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m == "kfold_ray" or m.startswith("kfold_ray.")}


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f.read_text(encoding="utf-8"), module_name(f, root),
                                             is_package=f.name == "__init__.py", modules=modules)
            for f in files}


# ---- the rules --------------------------------------------------------------------------------
def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, entry) of the longest entry of `LAYERS` that holds ``module``; the root package
    holds only itself."""
    best = None
    for rank, entries in enumerate(LAYERS):
        for entry in entries:
            holds = module == entry or (entry != "kfold_ray" and module.startswith(entry + "."))
            if holds and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    return best


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import against the order (or a module no layer holds)."""
    out = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        if here is None:
            out.append(f"{module} is in no layer: give its package a place in LAYERS")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is None:
                out.append(f"{module} imports {target}, which is in no layer")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                out.append(f"{module} ({here[1]}) imports {target} ({there[1]}): against the flow")
            if module in ONLY and target not in ONLY[module]:
                out.append(f"{module} imports {target}: it may import only {sorted(ONLY[module])}")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of modules that import each other (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---- the package as it is -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_imports_follow_the_data_flow(graph):
    assert violations(graph) == []


def test_no_circle(graph):
    assert circles(graph) == []


def test_every_layer_entry_exists(graph):
    """A layer that names nothing is a typo (entries for stages still to come are marked)."""
    to_come: set[str] = set()
    for entries in LAYERS:
        for entry in entries:
            if entry not in to_come:
                assert entry in graph, f"{entry} in LAYERS is not a module or package"


# ---- the test of the test ----------------------------------------------------------------------
def test_an_import_against_the_flow_is_caught(graph):
    bad = {**graph, "kfold_ray.storage._rundir": graph["kfold_ray.storage._rundir"]
           | {"kfold_ray.data._fold_plan"}}
    assert violations(bad) == ["kfold_ray.storage._rundir (kfold_ray.storage) imports "
                               "kfold_ray.data._fold_plan (kfold_ray.data): against the flow"]


def test_an_import_between_packages_of_one_layer_is_caught(graph):
    bad = {**graph, "kfold_ray.cluster._plan": graph["kfold_ray.cluster._plan"]
           | {"kfold_ray.detectron2._config"}}
    assert len(violations(bad)) == 1


def test_the_cli_reaching_past_the_api_is_caught(graph):
    bad = {**graph, "kfold_ray._cli": graph["kfold_ray._cli"] | {"kfold_ray.report._rank"}}
    assert violations(bad) == ["kfold_ray._cli imports kfold_ray.report._rank: it may import only "
                               f"{sorted(ONLY['kfold_ray._cli'])}"]


def test_a_module_in_no_layer_is_caught(graph):
    assert violations({**graph, "kfold_ray.grabbag._utils": set()}) == [
        "kfold_ray.grabbag._utils is in no layer: give its package a place in LAYERS"]


def test_a_circle_is_caught(graph):
    assert "kfold_ray.report._overlays" in graph["kfold_ray.report._page"]
    bad = {**graph, "kfold_ray.report._overlays": graph["kfold_ray.report._overlays"]
           | {"kfold_ray.report._page"}}
    assert circles(bad) == [["kfold_ray.report._overlays", "kfold_ray.report._page"]]
    assert circles({"a": {"a"}}) == [["a"]]


def test_function_level_and_type_checking_imports_count():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import _sibling\n"
        "from ..storage._storage import Storage\n"
        "if TYPE_CHECKING:\n"
        "    from ..data._dataset import CocoDataset\n"
        "def f():\n"
        "    import kfold_ray.report._rank\n"
        "    from .._exceptions import one_line\n"
        "    from .. import __version__\n"
    )
    modules = {"kfold_ray.run._sibling", "kfold_ray.storage._storage", "kfold_ray.data._dataset",
               "kfold_ray.report._rank", "kfold_ray._exceptions"}
    assert imports_of(source, "kfold_ray.run._x", is_package=False, modules=modules) == {
        "kfold_ray.run._sibling", "kfold_ray.storage._storage", "kfold_ray.data._dataset",
        "kfold_ray.report._rank", "kfold_ray._exceptions", "kfold_ray"}
