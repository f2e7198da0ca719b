"""The layers of the code (docs/architecture.md), checked from the source: every import, at module level or inside a
function, is an edge of the import graph.

    stages (train_*.py, evaluate.py)  ->  score_training  ->  infra/, lora, modeling, data/, evaluation/
                                      ->  families, utils

A layer imports downward only, so the graph has no circle; data/ does not import the models; families and utils
import no project module; no module imports a script (a stage or tiny_models.py: what two stages share lives
below them, as the score-model code of train_rm.py, train_cm.py and evaluate.py lives in score_training); only the
stages import score_training; and nothing outside tests/ reads tests/ at run time.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("data", "evaluation", "infra")
SCRIPTS = {"train_sft", "train_rm", "train_cm", "train_ppo_lag", "train_dpo", "evaluate", "tiny_models"}
CONSUMERS = ("tests", "benchmarks", "scripts")  # run the code from outside; they may import anything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    files = {module_name(p): p for p in ROOT.glob("*.py")}
    for package in PACKAGES + CONSUMERS:
        files.update({module_name(p): p for p in (ROOT / package).rglob("*.py")})
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from data import x` imports `data`, and `data.x` if that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def production(name: str) -> bool:
    return name.split(".")[0] not in CONSUMERS


def test_the_graph_is_read_from_the_source():
    g = graph()
    # a known edge of each kind: a stage importing the models, data importing its own package, a function-level one
    assert "modeling" in g["train_ppo_lag"]
    assert "data.sources" in g["data.encoding"]
    assert "families" in g["modeling"]


def test_families_and_utils_import_no_project_module():
    g = graph()
    assert g["families"] == set()
    assert g["utils"] == set(), f"utils imports {sorted(g['utils'])}"


def test_data_does_not_import_the_models_or_the_plumbing():
    for name, targets in graph().items():
        if name == "data" or name.startswith("data."):
            assert not {t for t in targets if t.split(".")[0] in ("modeling", "lora", "infra") or t in SCRIPTS}, name


def test_no_module_imports_a_script():
    found = {(name, t) for name, targets in graph().items() if production(name) for t in targets & SCRIPTS}
    assert found == set(), f"script imports: {sorted(found)}"


def test_score_training_sits_between_the_stages_and_the_layers_below():
    g = graph()
    importers = {name for name, targets in g.items() if production(name) and "score_training" in targets}
    assert {"train_rm", "train_cm", "evaluate"} <= importers <= SCRIPTS, f"imported by {sorted(importers)}"
    assert {"infra.optim", "modeling", "data"} <= g["score_training"]  # it builds on the layers below


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (or a module importing itself) are circles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    g = graph()
    # a package's __init__ re-exporting its modules is not a circle of layers: fold each package into one node
    def node(name):
        top = name.split(".")[0]
        return top if top in ("data", "evaluation") else name
    folded = {}
    for name, targets in g.items():
        if production(name):
            folded.setdefault(node(name), set()).update(node(t) for t in targets if production(t) and node(t) != node(name))
    assert strongly_connected(folded) == []


def test_nothing_reads_tests_at_run_time():
    for name, path in project_files().items():
        if not production(name):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in ("tests", "tests/") and not node.value.startswith("tests/fixtures"), (
                    f"{path.name} names the tests folder: {node.value!r}")
