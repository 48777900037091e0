"""The layout a reader relies on: the modules of common/ import each other in one direction (no
cycle), and imports sit at the top of each file; only optional dependencies (the compiled
extension, scikit-image for the embedded set's textures, onnx/onnxruntime/tensorboard, the
benchmark's anchors) may be imported inside a function, where their absence is handled."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = {"skimage", "common._C", "onnx", "onnxruntime", "torch.utils.tensorboard",
            "tensorboard",
            "lap", "MultiScaleDeformableAttention"}  # bench/: anchors installed by hand


def python_files(*folders):
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def imports(tree):
    """(module name, node, inside a function?) for every import statement of a module."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, child, in_function
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if base == "common" or (child.level == 0 and base == ""):
                    for a in child.names:  # "from common import ops" imports common.ops
                        yield f"{base}.{a.name}" if base else a.name, child, in_function
                else:
                    yield base, child, in_function
            yield from walk(child, inside)
    yield from walk(tree, False)


def parse(path):
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read(), path)


def common_graph():
    graph = {}
    for path in python_files("common"):
        name = "common." + os.path.basename(path)[:-3]
        graph[name] = {m for m, _, _ in imports(parse(path))
                       if m.startswith("common.") and m != "common._C"}
    return graph


def find_cycle(graph):
    """A list of modules forming an import cycle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_common_has_no_import_cycle():
    graph = common_graph()
    assert "common.engine" in graph and graph["common.engine"]  # the walk sees the imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_layers_point_one_way():
    """The chain a reader can draw: lower layers never import higher ones."""
    graph = common_graph()
    order = ["common.distributed", "common.config", "common.ops", "common.box_ops",
             "common.backbone", "common.transformer", "common.matcher", "common.criterion",
             "common.detr", "common.checkpoint", "common.synthetic", "common.data",
             "common.evaluate", "common.pretrain", "common.logger", "common.figures",
             "common.engine", "common.cli", "common.distill"]
    rank = {m: i for i, m in enumerate(order)}
    for module, deps in graph.items():
        for dep in deps:
            if module in rank and dep in rank:
                assert rank[dep] < rank[module], f"{module} imports {dep}, a higher layer"


# modules of an official repository, imported from the checkout named on the command line
FROM_OFFICIAL_CHECKOUT = {"bench/official_parity.py": {"util", "models"}}


@pytest.mark.parametrize("path", list(python_files("common", "methods", "bench")))
def test_imports_sit_at_the_top(path):
    allowed = OPTIONAL | FROM_OFFICIAL_CHECKOUT.get(path, set())
    inside = [(m, node.lineno) for m, node, in_function in imports(parse(path))
              if in_function and m.split(".")[0] not in allowed and m not in allowed]
    assert not inside, f"{path}: imports inside a function: {inside}"
