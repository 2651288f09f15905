"""The package's architecture, checked: imports run one way, lowest first.

  sharding, tier1 -> model -> data -> train -> eval -> analysis
      -> unlearning, related -> cli

A module may import its own package and any lower layer, never a higher
one, nor a package beside it on the same layer (unlearning and related do
not know each other). The module import graph has no cycles. The library
never imports the `tasks` package or a script, only the binaries in `cli`
use gin, and nothing edits `sys.path`. `__main__` modules are entry points
(`python -m tiered_routing.train` runs the train binary), and so is
`tiered_routing.params` (`python -m tiered_routing.params`, the v1 command of
`cli.count_params`): they may import `cli`, and nothing imports them.

These rules are the README's "Layout" section; this test keeps the code and
that section from drifting apart.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tiered_routing"
LAYERS = (
    ("sharding", "tier1"),
    ("model",),
    ("data",),
    ("train",),
    ("eval",),
    ("analysis",),
    ("unlearning", "related"),
    ("cli",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LEGACY_ENTRY_POINTS = ("tiered_routing.params",)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _library_modules()


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports (a `from a import b` counts `a.b` when b is
  a module, else `a`)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in MODULES else node.module)
  return out


def _package(module: str) -> str:
  """'tiered_routing.train.steps' -> 'train'; top-level modules keep their
  own name ('tiered_routing.sharding' -> 'sharding')."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _is_entry_point(module: str) -> bool:
  return module.endswith(".__main__") or module in LEGACY_ENTRY_POINTS


GRAPH = {
    m: {i for i in _imports(p) if i in MODULES} for m, p in MODULES.items()
}


def test_every_package_has_a_layer():
  packages = {_package(m) for m in MODULES if not _is_entry_point(m)} - {""}
  assert packages <= set(LAYER_OF), packages - set(LAYER_OF)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
  if _is_entry_point(module):
    return
  own = _package(module)
  for imported in GRAPH[module]:
    assert not _is_entry_point(imported), f"{module} imports {imported}"
    other = _package(imported)
    if other in ("", own):
      continue
    assert LAYER_OF[other] < LAYER_OF[own], (
        f"{module} ({own}, layer {LAYER_OF[own]}) imports {imported} "
        f"({other}, layer {LAYER_OF[other]}); imports must run to lower "
        "layers only"
    )


def test_entry_points_only_run_binaries():
  for module in filter(_is_entry_point, MODULES):
    assert {_package(i) for i in GRAPH[module]} <= {"cli"}, module


def test_no_import_cycles():
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for nxt in sorted(GRAPH[module]):
      if state.get(nxt) == "open":
        cycle = stack[stack.index(nxt) :] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[module] = "done"

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])


def test_library_never_imports_tasks_or_scripts():
  for module, path in MODULES.items():
    roots = {i.split(".")[0] for i in _imports(path)}
    assert not roots & {"tasks", "scripts"}, module


def test_gin_only_in_the_binaries():
  for module, path in MODULES.items():
    if "gin" in {i.split(".")[0] for i in _imports(path)}:
      assert _package(module) == "cli", f"{module} imports gin"


def _python_files():
  for folder in ("tiered_routing", "tasks", "scripts", "tests"):
    yield from sorted((REPO / folder).rglob("*.py"))


def test_nothing_edits_sys_path_or_loads_files_as_modules():
  for path in _python_files():
    text = path.read_text(encoding="utf-8")
    for banned in ("sys.path", "spec_from_file_location"):
      assert banned not in text or path == pathlib.Path(__file__), (
          f"{path.relative_to(REPO)} uses {banned}; import modules instead"
      )


def test_scripts_are_imported_by_nothing():
  scripts = {p.stem for p in (REPO / "scripts").glob("*.py")}
  for path in _python_files():
    roots = {i.split(".")[0] for i in _imports(path)}
    assert not roots & (scripts | {"scripts"}), path


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_modules_stay_small(module):
  lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
  assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_functions_stay_short(module):
  tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      lines = node.end_lineno - node.lineno + 1
      assert lines <= MAX_FUNCTION_LINES, f"{module}.{node.name}: {lines}"


def test_at_most_eight_layers():
  assert len(LAYERS) <= 8
