"""The package's shape: imports point one way, pieces stay small, names and module paths have one home."""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fast_subset import lengthy

PACKAGE = Path(__file__).resolve().parents[1] / "blip_trace_widgets"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    """"tracing" for tracing.py, "widgets.live" for widgets/live.py, "widgets" for widgets/__init__.py (the package's
    own __init__.py is "__init__")."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(name: str, path: Path) -> list[str]:
    parts = name.split(".") if name != "__init__" else []
    return parts if path.name == "__init__.py" else parts[:-1]


@functools.cache
def nodes(source: str) -> tuple[ast.AST, ...]:
    """Every node of a module's syntax tree, parsed once for all the checks here (they only read the nodes)."""
    return tuple(ast.walk(ast.parse(source)))


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top, inside functions or only for type checkers (an import
    under ``TYPE_CHECKING`` that would close a cycle is a cycle: the modules still depend on each other)."""
    names = {module_name(path) for path in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name = module_name(path)
        base = _package_of(name, path)
        edges = set()
        for node in nodes(path.read_text()):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                start = base[: len(base) - (node.level - 1)]
                targets = ([".".join([*start, *node.module.split(".")])] if node.module
                           else [".".join([*start, alias.name]) for alias in node.names])
                edges.update(t if t in names else t.rsplit(".", 1)[0] for t in targets)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["causal_trace.tracer"] and "core.names" in graph["models.anatomy"], "the graph reader is broken"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("low,high", [
    ("core.names", "models.anatomy"), ("models.anatomy", "models.engine"), ("models.engine", "causal_trace.blocks"),
    ("causal_trace.results", "causal_trace.tracer"), ("causal_trace.tracer", "causal_trace.averages"),
    ("causal_trace.averages", "sweeps.plots"), ("causal_trace.plots", "widgets"), ("causal_trace.tracer", "cli"),
])
def test_dependencies_point_one_way(low, high):
    """``high`` may use ``low``; ``low`` never reaches ``high``, however indirectly."""
    graph = import_graph()
    seen, todo = set(), [low]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert high not in seen, f"{low} reaches {high}"


def test_functions_and_classes_stay_small():
    too_long = []
    for path in MODULES:
        for node in nodes(path.read_text()):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = (node.end_lineno or 0) - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                too_long.append(f"{path.name}:{node.name} ({size} lines)")
            if isinstance(node, ast.ClassDef) and size > 200:
                too_long.append(f"{path.name}:class {node.name} ({size} lines)")
    assert not too_long, "split these: " + ", ".join(too_long)


def test_only_anatomy_spells_blip_module_paths():
    paths = re.compile(r"['\"](text_encoder|text_decoder|vision_model)\.[a-z_.]+")
    offenders = [p.name for p in MODULES if p.name not in ("anatomy.py", "relocated.py") and paths.search(p.read_text())]
    assert not offenders, f"BLIP module paths outside anatomy.py: {offenders}"


SHARED_OPTIONS = re.compile(r"add_argument\(\s*['\"]--(model|dtype|device)['\"]")


def test_the_options_every_command_shares_are_built_in_one_place():
    """--model, --dtype and --device are spelled once, in core/command_line.py, for every subcommand."""
    offenders = [str(p.relative_to(PACKAGE)) for p in MODULES
                 if p.name != "command_line.py" and SHARED_OPTIONS.search(p.read_text())]
    assert not offenders, f"build --model/--dtype/--device with core.command_line's add_*_option: {offenders}"
    assert SHARED_OPTIONS.search('parser.add_argument("--device", default=None)')  # the finder sees the form


def test_block_and_kind_names_come_from_names_py():
    """Block names are spelled as string literals only in names.py (and in docstrings and messages)."""
    offenders = []
    for path in MODULES:
        if path.name == "names.py":
            continue
        for node in nodes(path.read_text()):
            if isinstance(node, ast.Constant) and node.value in ("question_encoder", "answer_decoder", "vision_encoder",
                                                                 "caption_decoder", "itm_encoder"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"block names written out instead of taken from names.py: {offenders}"


#: The vision encoder's name, as names.py spells it and as anatomy.py imports it.
VISION_NAMES = ("VISION_ENCODER", "VISION_BLOCK")


def vision_name_comparisons(source: str) -> list[int]:
    """Lines that compare something with the vision encoder's name (``block == VISION_ENCODER``, ``!=``, ``is``,
    ``x in (A, VISION_ENCODER)``, ``anatomy.VISION_BLOCK`` alike) instead of asking the block
    (``facts(block).image_side``, ``block.image_side``)."""
    def named(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Name) and node.id in VISION_NAMES)
                or (isinstance(node, ast.Attribute) and node.attr in VISION_NAMES))

    found = []
    for node in nodes(source):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            listed = [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts]
            if any(named(o) for o in (*operands, *listed)):
                found.append(node.lineno)
    return sorted(found)


def test_no_block_name_is_compared_with_the_vision_encoder_s():
    """What a block is (its positions the image's, its default corruption stage, the stages that may corrupt it) is
    its row of names.BLOCK_FACTS, asked of the block: only names.py, their home, may compare names."""
    offenders = [f"{module_name(path)}:{line}" for path in MODULES if path.relative_to(PACKAGE) != Path("core/names.py")
                 for line in vision_name_comparisons(path.read_text())]
    assert not offenders, f"ask the block (facts(name).image_side, block.image_side) instead of comparing: {offenders}"


def test_the_vision_comparison_finder_sees_each_form():
    flagged = ("block == VISION_ENCODER\n"
               "config.block != VISION_ENCODER\n"
               "rows['block'].iloc[0] == VISION_ENCODER\n"
               "VISION_BLOCK == block\n"
               "x != anatomy.VISION_BLOCK\n"
               "[b for b in blocks if b != VISION_ENCODER]\n"
               "block in (QFORMER, VISION_ENCODER)\n")
    assert vision_name_comparisons(flagged) == [1, 2, 3, 4, 5, 6, 7]
    asked = ("facts(block).image_side\n"
             "blocks = (QFORMER, VISION_ENCODER)\n"
             "TraceConfig(block=VISION_ENCODER)\n"
             "LAYERS = {VISION_BLOCK: 'x'}\n"
             "block in LANGUAGE_BLOCKS\n")
    assert vision_name_comparisons(asked) == []


def test_importing_the_package_is_lazy():
    code = "import sys, blip_trace_widgets; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_public_name_resolves():
    import blip_trace_widgets

    for name in blip_trace_widgets.__all__:
        assert getattr(blip_trace_widgets, name) is not None
    with pytest.raises(AttributeError):
        blip_trace_widgets.no_such_name  # noqa: B018


def test_one_version_source():
    from importlib.metadata import version

    import blip_trace_widgets

    assert version("blip-trace-widgets") == blip_trace_widgets.__version__
    assert 'dynamic = ["version"]' in (PACKAGE.parent / "pyproject.toml").read_text()


@lengthy
def test_public_functions_named_like_their_modules_survive_importing_the_modules():
    """sweep, knockout and knockout_sweep are functions, and were modules of the 0.3 layout (still importable by
    their old paths): importing the module first must not hide the function (Python's import sets the submodule
    as the package's attribute)."""
    code = ("import blip_trace_widgets.sweep, blip_trace_widgets.knockout, blip_trace_widgets.knockout_sweep\n"
            "import blip_trace_widgets.sweeps.sweep, blip_trace_widgets.attention_knockout.knockout\n"
            "from blip_trace_widgets import knockout, knockout_sweep, sweep\n"
            "import blip_trace_widgets as package, types\n"
            "print(all(callable(f) and not isinstance(f, types.ModuleType) for f in (sweep, knockout, knockout_sweep,"
            " package.sweep)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"]


def import_depths(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level: 0 when it imports no package module, else one more than the highest it imports."""
    depths: dict[str, int] = {}

    def depth(module: str) -> int:
        if module not in depths:
            depths[module] = 1 + max((depth(m) for m in graph.get(module, ()) if m in graph), default=-1)
        return depths[module]

    for module in graph:
        depth(module)
    return depths


def layout_rows(text: str) -> list[tuple[int, str]]:
    """The (level, module) rows of the reference's Layout table."""
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([\w/]+)\.py` \|", section, re.M)
    return [(int(level), name.removesuffix("/__init__").replace("/", ".")) for level, name in rows]


def test_the_reference_lists_every_module_in_import_order(capsys):
    """docs/reference.md's Layout table is the import graph's order: every module, each at its level (a module
    sits above everything it imports), as this test prints it."""
    depths = import_depths(import_graph())
    expected = sorted((level, name) for name, level in depths.items())
    lines = [f"{level}: {', '.join(name for lvl, name in expected if lvl == level)}"
             for level in sorted(set(depths.values()))]
    with capsys.disabled():
        print("\nimport order (level: modules):")
        print("\n".join(f"  {line}" for line in lines))
    reference = (PACKAGE.parent / "docs" / "reference.md").read_text()
    listed = reference.split("<!-- import order -->", 2)
    assert len(listed) == 3 and listed[1].strip("\n`") == "\n".join(lines), \
        "docs/reference.md's import order (between the <!-- import order --> marks) must be, as this test prints it:\n" + \
        "\n".join(lines)
    rows = layout_rows(reference)
    missing = sorted(set(depths) - {name for _, name in rows})
    assert not missing, f"docs/reference.md's Layout has no row for {missing}"
    assert rows == expected, ("docs/reference.md's Layout must list (level, module) as "
                              f"{[f'{lvl} {name}' for lvl, name in expected]}")


def test_the_layout_reader_sees_a_wrong_order():
    text = "## Layout\n| 0 | `names.py` | x |\n| 3 | `anatomy.py` | y |\n## Next\n"
    assert layout_rows(text) == [(0, "names"), (3, "anatomy")]
    assert import_depths({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"a": 1, "b": 0, "c": 2}


def test_no_private_name_is_imported_across_modules():
    """A name a module shares is public: no ``from .other import _name`` inside the package."""
    offenders = []
    for path in MODULES:
        for node in nodes(path.read_text()):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                offenders += [f"{module_name(path)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, f"private names imported across modules: {offenders}"


def private_reaches(source: str) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``: a private member of another object (dunders and
    IPython's ``_repr_png_``-style display hooks aside)."""
    found = []
    for node in nodes(source):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("_"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_private_member_of_another_object_is_reached():
    """A tracer's parts talk through public members: no ``tracer._runs`` or ``swap._ids`` inside the package."""
    offenders = {module_name(path): private_reaches(path.read_text()) for path in MODULES}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"private members reached from outside their object: {offenders}"
    assert private_reaches("a._b\nself._c\nx.__len__\ncls._d\nax._repr_png_") == ["a._b (line 1)"]


#: Each subpackage's floor: a module may import from its own subpackage or from one on a lower floor, never up or
#: sideways. docs/reference.md's Layout section lists the same floors.
FLOORS: dict[str, int] = {
    "core": 0, "relocated": 0,
    "corruptions": 1,
    "models": 2,
    "datasets": 3,
    "causal_trace": 4,
    "attention_knockout": 5, "sweeps": 5,
    "circuits": 6, "lenses": 6,
    "widgets": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 10,
}


def room(module: str) -> str:
    return module.split(".", 1)[0]


def floor_breaches(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """``a -> b`` where b's subpackage sits on the same floor as a's (another subpackage) or above it."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if room(a) != room(b) and floors[room(b)] >= floors[room(a)])


def test_every_module_sits_in_a_subpackage_with_a_floor():
    rooms = {room(module) for module in import_graph()}
    assert rooms <= set(FLOORS), f"give these a floor in FLOORS and in docs/reference.md: {sorted(rooms - set(FLOORS))}"


def test_subpackages_import_only_from_lower_floors():
    assert not floor_breaches(import_graph(), FLOORS), floor_breaches(import_graph(), FLOORS)


def test_the_floor_check_sees_a_breach():
    graph = {"core.names": {"models.heads"}, "models.heads": {"core.names"}, "sweeps.a": {"attention_knockout.b"}}
    assert floor_breaches(graph, FLOORS) == ["core.names -> models.heads", "sweeps.a -> attention_knockout.b"]


def test_the_reference_names_the_floors():
    section = (PACKAGE.parent / "docs" / "reference.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| floor (\d+) \| `(\w+)/?` \|", section, re.M)[::-1] and
                  [(name, int(level)) for level, name in re.findall(r"^\| floor (\d+) \| `(\w+)/?` \|", section, re.M)])
    folders = {name: level for name, level in FLOORS.items() if (PACKAGE / name).is_dir()}
    assert listed == folders, f"docs/reference.md's Layout must list the subpackages' floors: {folders}"


STAGE_NAMES = {"image", "patches", "pixels", "question", "queries", "projected"}
DIRECTION_NAMES = {"denoise", "noise"}
#: The modules that own the corruption stage and direction axes: one class per stage or direction.
AXIS_OWNERS = {"causal_trace.stages", "causal_trace.directions", "core.names"}


def axis_comparisons(source: str) -> list[str]:
    """``x.corrupt == "question"``, ``direction != "noise"``, ``stage in ("patches", "pixels")`` or ``stage in
    QUERY_STAGES``: a branch on a corruption stage's or a direction's name, which the stage's or direction's class
    should answer."""
    names = STAGE_NAMES | DIRECTION_NAMES
    found = []
    for node in nodes(source):
        if not isinstance(node, ast.Compare) or not re.search(r"corrupt|stage|direction", ast.unparse(node)):
            continue
        for side in [node.left, *node.comparators]:
            values = [side] + (list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [])
            if any(isinstance(v, ast.Constant) and v.value in names for v in values) or \
                    (isinstance(side, ast.Name) and side.id in ("QUERY_STAGES", "STAGES", "DIRECTIONS")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_no_module_branches_on_a_stage_or_direction_name():
    """Which way a trace runs and where its corruption acts are classes (causal_trace/directions.py and
    causal_trace/stages.py): no other module compares their names."""
    offenders = {module_name(path): axis_comparisons(path.read_text()) for path in MODULES
                 if module_name(path) not in AXIS_OWNERS}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"branches on a stage's or a direction's name (ask its class instead): {offenders}"
    assert axis_comparisons("a = x.corrupt == 'question'\nb = direction != 'noise'\nc = stage in ('patches', "
                            "'pixels')\ne = stage in QUERY_STAGES\nf = kind == 'mlp'\ng = name == 'image'") == [
        "line 1: x.corrupt == 'question'", "line 2: direction != 'noise'", "line 3: stage in ('patches', 'pixels')",
        "line 4: stage in QUERY_STAGES"]
