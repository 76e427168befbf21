"""The house in layers: each module imports only modules of lower layers, at the top of the file."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lower numbers sit lower: a module may import any module of a strictly lower layer, nothing else.
LAYERS = {
    "config": 0, "utils": 0, "specs": 0,
    "synthetic": 1, "sampler": 1, "transforms": 1, "image_check": 1, "metrics": 1, "checkpoint": 1,
    "data": 2, "device_data": 2, "model": 2, "loss": 2, "rerank": 2, "visualize": 2,
    "cuda_graph": 3, "centroids": 3, "faults": 3,
    "report": 4,
    "evaluate": 5,
    "train": 6, "retrieve": 6,
    "export": 7, "bench": 7,
}


def project_modules():
    """The repository's top-level modules."""
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(source, modules):
    """[(line, imported module, at top level)] of a module's imports of project modules."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(node.lineno, name, id(node) in top_level) for name in names if name in modules]
    return found


def layer_violations(module, source, modules):
    """Messages for each import that points up or sideways, or sits inside a function."""
    problems = []
    for line, name, top in project_imports(source, modules):
        where = f"{module}.py:{line}: import {name}"
        if not top:
            problems.append(f"{where} inside a function (imports between project modules go at the top)")
        if LAYERS[name] >= LAYERS[module]:
            problems.append(f"{where} points {'sideways' if LAYERS[name] == LAYERS[module] else 'up'} "
                            f"(layer {LAYERS[module]} -> {LAYERS[name]})")
    return problems


def test_every_module_has_a_layer():
    assert set(project_modules()) <= set(LAYERS), "add the new module to LAYERS in test/test_layers.py"


@pytest.mark.parametrize("module", project_modules())
def test_imports_point_down_and_sit_at_the_top(module):
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        assert layer_violations(module, f.read(), set(project_modules())) == []


@pytest.mark.parametrize("module,source", [
    ("evaluate", "import utils\nimport train\n"),                              # the parser cycle
    ("evaluate", "def draw():\n    from retrieve import visualize_evaluation\n"),  # the pictures
    ("data", "def baseline():\n    from evaluate import evaluate_rank\n"),       # the pixel baseline
])
def test_the_old_cycles_would_be_caught(module, source):
    problems = layer_violations(module, source, set(LAYERS))
    assert problems and all(p.startswith(f"{module}.py:") for p in problems)
