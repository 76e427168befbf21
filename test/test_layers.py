"""The house in layers: each module imports only modules of lower layers, at the top of the file; no import cycle;
no function over 60 lines or 8 parameters; checkpoints read by one torch.load, in checkpoint.py."""
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


MAX_LINES, MAX_PARAMS = 60, 8


def import_graph():
    """{module: set of project modules it imports}."""
    modules = set(project_modules())
    graph = {}
    for module in modules:
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            graph[module] = {name for _, name, _ in project_imports(f.read(), modules)}
    return graph


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if state.get(name) == "open":
                return path[path.index(name):] + [name]
            if name not in state:
                cycle = visit(name, path + [name])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def oversized_functions(module, source):
    """Messages for each function over MAX_LINES lines or MAX_PARAMS parameters (self/cls not counted; *args and
    **kwargs one each)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = node.args
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
        params += [a.arg for a in (args.vararg, args.kwarg) if a]
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES:
            problems.append(f"{module}.py:{node.lineno} {node.name}: {lines} lines (at most {MAX_LINES})")
        if len(params) > MAX_PARAMS:
            problems.append(f"{module}.py:{node.lineno} {node.name}: {len(params)} parameters (at most {MAX_PARAMS})")
    return problems


def torch_loads(source):
    """Lines that call torch.load."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_would_be_caught():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("module", project_modules())
def test_functions_fit_on_a_screen_and_take_few_parameters(module):
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        assert oversized_functions(module, f.read()) == []


def test_an_oversized_function_would_be_caught():
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    source = f"def long():\n{long_body}\ndef wide(self, a, b, c, d, e, f, g, h, *i):\n    pass\n" \
             "def fine(self, a, b, c, d, e, f, g, h):\n    pass\n"
    problems = oversized_functions("m", source)
    assert [p.split(" ")[1] for p in problems] == ["long:", "wide:"]


def test_checkpoints_are_read_by_one_torch_load_in_checkpoint_py():
    loads = {}
    for module in project_modules():
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            found = torch_loads(f.read())
        if found:
            loads[module] = found
    assert list(loads) == ["checkpoint"] and len(loads["checkpoint"]) == 1, loads
