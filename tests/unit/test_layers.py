"""The package's layers, checked on the source: no import cycle, imports only downward, and the heavy
clients (Ray, MLflow, boto3, subprocesses) confined to the layer that owns them.

Layers, bottom to top (docs/extending.md#layers), each a folder:
- core (`pipeline/core/`): the maths and the schema (models, losses, training step, metrics, datasets,
  config). Pure torch / numpy; reads local files at most.
- io (`pipeline/io/`): the adapters to MLflow, S3, files written for DVC, plots, export, the team's servers.
- runtime (`pipeline/ray/`): Ray (Train workers, Tune trials, the driver).
- entry: the command line (`pipeline/cli.py`) and the DVC stages (`stages/`).

Imports inside functions count (they are imports all the same); those under `if TYPE_CHECKING:`
do not (they never run). A new module goes in the folder of its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FOLDERS = {"pipeline.core": "core", "pipeline.io": "io", "pipeline.ray": "runtime"}
EMPTY_INITS = ("pipeline", "stages", *FOLDERS)  # docstrings only: an import of them is an import of a module in them
RANK = {"core": 0, "io": 1, "runtime": 2, "entry": 3}

# third-party clients and the layers allowed to import them
CONFINED = {"ray": {"runtime"}, "mlflow": {"io"}, "boto3": {"io"}, "botocore": {"io"}, "subprocess": {"io", "entry"}}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def layer(module: str) -> str:
    if module.startswith("stages") or module == "pipeline.cli":
        return "entry"
    for folder, name in FOLDERS.items():
        if module == folder or module.startswith(folder + "."):
            return name
    if module == "pipeline":
        return "core"
    raise AssertionError(f"{module} lies in no layer folder: move it into pipeline/core, pipeline/io or pipeline/ray")


def imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def local_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imports(path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target not in EMPTY_INITS:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_inits_are_empty_so_the_graph_sees_every_edge():
    for init in [f"{m.replace('.', '/')}/__init__.py" for m in EMPTY_INITS]:
        body = ast.parse((ROOT / init).read_text()).body
        assert all(isinstance(n, ast.Expr) for n in body), f"{init} should hold a docstring at most"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(local_graph()) == []


def test_imports_go_down_the_layers_only():
    upward = [
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in local_graph().items()
        for t in sorted(targets)
        if RANK[layer(t)] > RANK[layer(m)] and not (layer(m) == layer(t) == "entry")
    ]
    assert upward == []


def test_nothing_imports_the_entry_points():
    into_entry = [
        f"{m} imports {t}"
        for m, targets in local_graph().items()
        for t in sorted(targets)
        if layer(t) == "entry" and not (m.startswith("stages") and t.startswith("stages"))
    ]
    assert into_entry == []


def test_heavy_clients_stay_in_their_layer():
    mods = modules()
    misplaced = [
        f"{name} ({layer(name)}) imports {client}"
        for name, path in mods.items()
        for client, allowed in CONFINED.items()
        if any(i == client or i.startswith(client + ".") for i in imports(path)) and layer(name) not in allowed
    ]
    assert misplaced == []


def test_every_module_lies_in_the_folder_of_its_layer():
    outside = [
        m for m in modules() if m.startswith("pipeline.") and m != "pipeline.cli" and not m.startswith(tuple(FOLDERS))
    ]
    assert outside == []
    assert {layer(m) for m in modules()} == set(RANK)
