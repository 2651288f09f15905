"""Packaging: the supported Python versions, setup.py's ranges and the
per-version constraints files agree with each other, with README.md and with
.ci/run.

Each supported Python version (every 3.x that python_requires admits) has one
constraints file, which pins every requirement of setup.py (the `test` extra
included) to one exact version inside setup.py's range, and pins at least the
packages that the 3.11 file pins. README.md names each file, and .ci/run runs
the README's fast test subset on the newest supported version.
"""

import os
import pathlib
import re
import runpy
import shlex

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]

# Python version -> its constraints file (3.11 keeps the historical name that
# the README's two set-up commands, .ci/run and scripts/launch_tpu.sh use).
CONSTRAINTS = {
    "3.11": "constraints.txt",
    "3.12": "constraints-py312.txt",
    "3.13": "constraints-py313.txt",
}
# Packages a file may pin beyond the 3.11 file's set: pip freeze lists
# setuptools and wheel from Python 3.12 on (tensorflow and astunparse
# require them at run time), and python-dateutil 4 requires tzdata.
ALLOWED_EXTRA = {"setuptools", "wheel", "tzdata"}


@pytest.fixture(scope="module")
def setup_kwargs():
  """setup.py's keyword arguments, read by running it with setup() stubbed."""
  captured = {}
  real_setup = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  cwd = pathlib.Path.cwd()
  try:
    os.chdir(REPO)  # setup.py reads README.md relative to the cwd.
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
  finally:
    os.chdir(cwd)
    setuptools.setup = real_setup
  assert captured, "setup.py did not call setuptools.setup"
  return captured


def _requirements(kwargs, extras=("test",)):
  reqs = [Requirement(r) for r in kwargs["install_requires"]]
  for extra in extras:
    reqs += [Requirement(r) for r in kwargs["extras_require"][extra]]
  return reqs


def _pins(name):
  """The constraints file's pins: {canonical name: Version}."""
  pins = {}
  for lineno, line in enumerate(
      (REPO / name).read_text(encoding="utf-8").splitlines(), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
    assert match, f"{name}:{lineno}: not an exact pin 'name==version': {line}"
    key = canonicalize_name(match.group(1))
    assert key not in pins, f"{name}:{lineno}: {key} pinned twice"
    pins[key] = Version(match.group(2))
  return pins


def _admitted_minors(kwargs):
  spec = SpecifierSet(kwargs["python_requires"])
  return [f"3.{m}" for m in range(0, 30)
          if any(spec.contains(f"3.{m}.{p}") for p in (0, 1, 7))]


def test_python_requires_admits_exactly_the_supported_versions(setup_kwargs):
  assert _admitted_minors(setup_kwargs) == ["3.11", "3.12", "3.13"]


def test_every_supported_version_has_its_constraints_file(setup_kwargs):
  assert sorted(CONSTRAINTS) == _admitted_minors(setup_kwargs)
  for name in CONSTRAINTS.values():
    assert (REPO / name).is_file(), name
  on_disk = sorted(p.name for p in REPO.glob("constraints*.txt"))
  assert on_disk == sorted(CONSTRAINTS.values())


def test_setup_py_gives_ranges_not_exact_pins(setup_kwargs):
  """Exact versions live in the constraints files: a '==' in setup.py would
  pin a release that may have no wheels for some supported version."""
  for req in _requirements(setup_kwargs, extras=("test", "tpu", "gpu")):
    ops = {s.operator for s in req.specifier}
    assert "==" not in ops and "===" not in ops, str(req)
    assert ">=" in ops, f"{req}: give the lowest tested version"


@pytest.mark.parametrize("python", sorted(CONSTRAINTS))
def test_constraints_pin_every_requirement_inside_its_range(
    setup_kwargs, python):
  name = CONSTRAINTS[python]
  pins = _pins(name)
  for req in _requirements(setup_kwargs):
    key = canonicalize_name(req.name)
    assert key in pins, f"{name} does not pin {req.name}"
    assert req.specifier.contains(pins[key], prereleases=True), (
        f"{name} pins {req.name}=={pins[key]}, outside setup.py's "
        f"{req.specifier}")


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_constraints_pin_the_same_packages_as_3_11(python):
  base = set(_pins(CONSTRAINTS["3.11"]))
  pins = set(_pins(CONSTRAINTS[python]))
  assert not base - pins, (
      f"{CONSTRAINTS[python]} leaves unpinned: {sorted(base - pins)}")
  assert pins - base <= ALLOWED_EXTRA, (
      f"{CONSTRAINTS[python]} pins more than the 3.11 file: "
      f"{sorted(pins - base - ALLOWED_EXTRA)}")


def test_jax_family_pins_agree():
  """jax and jaxlib are released together; flax/orbax need a matching jax."""
  for python, name in CONSTRAINTS.items():
    pins = _pins(name)
    assert pins["jax"] == pins["jaxlib"], (python, pins["jax"], pins["jaxlib"])


def _readme():
  return (REPO / "README.md").read_text(encoding="utf-8")


def _setup_section():
  readme = _readme()
  start = readme.index("## Set-up")
  end = readme.index("\n## ", start + 1)
  return readme[start:end]


def test_readme_set_up_names_every_version_and_its_file():
  """The set-up section's table maps each version to its file, and the
  3.11 commands use constraints.txt."""
  section = _setup_section()
  for python, name in CONSTRAINTS.items():
    row = re.compile(
        rf"^\| Python {re.escape(python)}\b[^|\n]*\| `{re.escape(name)}` \|$",
        re.MULTILINE)
    assert row.search(section), f"no row '| Python {python} | `{name}` |'"
  three_eleven = CONSTRAINTS["3.11"]
  assert f"-c {three_eleven} && python -m pytest -q -n 2 tests" in section


FAST_RE = re.compile(r"python -m pytest -q -n 2 (tests/[^\n`]*?) "
                     r"-p no:cacheprovider")


def _fast_paths(text, where):
  found = FAST_RE.findall(text)
  assert found, f"no fast-subset pytest command in {where}"
  paths = {tuple(shlex.split(f)) for f in found}
  assert len(paths) == 1, f"{where} has different fast subsets: {paths}"
  return paths.pop()


def test_fast_subset_is_documented_run_by_ci_and_exists():
  readme = _fast_paths(_setup_section(), "README.md's set-up section")
  ci = _fast_paths((REPO / ".ci" / "run").read_text(encoding="utf-8"),
                   ".ci/run")
  assert readme == ci
  for path in readme:
    assert (REPO / path.split("::")[0]).exists(), path


def test_ci_runs_the_readme_test_command_and_the_newest_version():
  ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
  full = ('pip install -e ".[test]" -c constraints.txt && '
          "python -m pytest -q -n 2 tests")
  assert full in _setup_section()
  assert full in ci
  newest = max(CONSTRAINTS, key=lambda v: tuple(map(int, v.split("."))))
  assert f"python{newest}" in ci
  assert f"-c {CONSTRAINTS[newest]}" in ci
