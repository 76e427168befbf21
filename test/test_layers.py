"""The house in layers: each module imports only modules of lower layers, at the top of the file; no import cycle;
no function over 60 lines or 8 parameters; checkpoints read by one torch.load, in support/checkpoint.py; the layer
map in docs/layout.md and the README's Layout table name every module of the tree."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "support"  # the support modules, beneath the stages at the root

# Lower numbers sit lower: a module may import any module of a strictly lower layer, nothing else.
LAYERS = {
    "support.config": 0, "support.utils": 0, "support.specs": 0,
    "support.synthetic": 1, "support.sampler": 1, "support.transforms": 1, "support.image_check": 1,
    "support.metrics": 1, "support.checkpoint": 1,
    "data": 2, "model": 2, "loss": 2, "visualize": 2, "support.device_data": 2, "support.rerank": 2,
    "support.cuda_graph": 3, "support.centroids": 3, "support.faults": 3,
    "support.report": 4,
    "evaluate": 5,
    "train": 6, "retrieve": 6,
    "export": 7, "bench": 7,
}
MAX_LINES, MAX_PARAMS = 60, 8


def project_modules():
    """The repository's modules: the root's scripts and the support package's modules, as dotted names."""
    root = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    package = [f"{PACKAGE}.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, PACKAGE))
               if f.endswith(".py") and f != "__init__.py"]
    return sorted(root + package)


def module_path(module):
    """support.metrics -> ROOT/support/metrics.py."""
    return os.path.join(ROOT, *module.split(".")) + ".py"


def read_module(module):
    """A module's source text."""
    with open(module_path(module)) as f:
        return f.read()


def imported_names(node):
    """The dotted module names an import statement names (`from support import utils` names support.utils)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == PACKAGE:
            return [f"{PACKAGE}.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def project_imports(source, modules):
    """[(line, imported module, at top level)] of a module's imports of project modules."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    return [(node.lineno, name, id(node) in top_level) for node in ast.walk(tree) for name in imported_names(node)
            if name in modules]


def layer_violations(module, source, modules):
    """Messages for each import that points up or sideways, or sits inside a function."""
    problems = []
    for line, name, top in project_imports(source, modules):
        where = f"{module}:{line}: import {name}"
        if not top:
            problems.append(f"{where} inside a function (imports between project modules go at the top)")
        if LAYERS[name] >= LAYERS[module]:
            problems.append(f"{where} points {'sideways' if LAYERS[name] == LAYERS[module] else 'up'} "
                            f"(layer {LAYERS[module]} -> {LAYERS[name]})")
    return problems


def test_every_module_has_a_layer():
    assert set(project_modules()) == set(LAYERS), "add the new module to LAYERS in test/test_layers.py"


@pytest.mark.parametrize("module", project_modules())
def test_imports_point_down_and_sit_at_the_top(module):
    assert layer_violations(module, read_module(module), set(project_modules())) == []


@pytest.mark.parametrize("module,source", [
    ("evaluate", "from support import utils\nimport train\n"),                  # the parser cycle
    ("evaluate", "def draw():\n    from retrieve import visualize_evaluation\n"),  # the pictures
    ("data", "def baseline():\n    from evaluate import evaluate_rank\n"),       # the pixel baseline
    ("support.metrics", "from support.centroids import identity_centroids\n"),   # within the package
    ("support.utils", "import data\n"),                                           # the package under the stages
])
def test_the_old_cycles_would_be_caught(module, source):
    problems = layer_violations(module, source, set(LAYERS))
    assert problems and all(p.startswith(f"{module}:") for p in problems)


def import_graph():
    """{module: set of project modules it imports}."""
    modules = set(project_modules())
    return {module: {name for _, name, _ in project_imports(read_module(module), modules)} for module in modules}


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


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_would_be_caught():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


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
            problems.append(f"{module}:{node.lineno} {node.name}: {lines} lines (at most {MAX_LINES})")
        if len(params) > MAX_PARAMS:
            problems.append(f"{module}:{node.lineno} {node.name}: {len(params)} parameters (at most {MAX_PARAMS})")
    return problems


@pytest.mark.parametrize("module", project_modules())
def test_functions_fit_on_a_screen_and_take_few_parameters(module):
    assert oversized_functions(module, read_module(module)) == []


def test_an_oversized_function_would_be_caught():
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    source = f"def long():\n{long_body}\ndef wide(self, a, b, c, d, e, f, g, h, *i):\n    pass\n" \
             "def fine(self, a, b, c, d, e, f, g, h):\n    pass\n"
    assert [p.split(" ")[1] for p in oversized_functions("m", source)] == ["long:", "wide:"]


def torch_loads(source):
    """Lines that call torch.load."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_checkpoints_are_read_by_one_torch_load_in_checkpoint_py():
    loads = {module: torch_loads(read_module(module)) for module in project_modules()}
    loads = {module: lines for module, lines in loads.items() if lines}
    assert list(loads) == ["support.checkpoint"] and len(loads["support.checkpoint"]) == 1, loads


def documented_layers(text):
    """{module: layer} from docs/layout.md's layer map: rows `| N | `a.py`, `support/b.py` | ... |`."""
    layers = {}
    for layer, files in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        for path in re.findall(r"`([\w/]+)\.py`", files):
            layers[path.replace("/", ".")] = int(layer)
    return layers


def test_the_layer_map_in_docs_is_the_enforced_one():
    with open(os.path.join(ROOT, "docs", "layout.md")) as f:
        assert documented_layers(f.read()) == LAYERS


def test_the_readme_layout_names_every_module_and_only_existing_files():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]
    named = set(re.findall(r"`([\w/.]+)`", table))
    files = {os.path.relpath(module_path(m), ROOT) for m in project_modules()}
    assert files <= named, sorted(files - named)
    missing = [name for name in named if name.endswith((".py", "/")) and not os.path.exists(os.path.join(ROOT, name))]
    assert missing == []
