"""The package layout: no import cycles, modules of a readable size, project imports at module top,
one registry of methods, and an installation that cannot collide with a user's own `models` or
`experiments` package."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Directory -> the package it is imported (and installed) as; benchmarks/ is not installed.
PACKAGES = {"jaxinterp": "jaxinterp", "models": "jaxinterp.models",
            "experiments": "jaxinterp.experiments", "benchmarks": "benchmarks"}
# The layout rules of issue 25, measured from the repository root over these directories.
LAYOUT_DIRS = ("jaxinterp", "models", "experiments")
SOFT_LINES, MAX_OVER_SOFT, MAX_LINES = 450, 2, 750  # at most 2 modules over 450, none over 750
MAX_EXPERIMENT_LINES = 150  # every experiments/*.py: a thin binary over the library
MAX_ROOT_MODULES = 6  # files jaxinterp/*.py; the rest lives in subpackages by concept
MAX_README_LINES = 250
# Top-level names of the project's own modules: never imported inside a function body.
PROJECT_PACKAGES = ("jaxinterp", "models", "experiments")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for directory, pkg in PACKAGES.items():
    for path in (ROOT / directory).rglob("*.py"):
      parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
      if parts and parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join([pkg] + parts)] = path
  return out


def _imports(path: pathlib.Path, name: str, modules: dict) -> set[str]:
  """Every project module `path` imports, at any depth of the file (function-level imports too:
  a cycle hidden inside a function is still a cycle). `from pkg import sub` counts as importing
  the submodule `pkg.sub` when it is one, else `pkg`. `if TYPE_CHECKING:` blocks are skipped."""
  tree = ast.parse(path.read_text(), str(path))
  is_pkg = path.name == "__init__.py"
  found = set()

  def visit(node):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      for a in node.names:
        found.add(a.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        found.add(sub if sub in modules else base)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]):
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in state:
        cycle = dfs(v)
        if cycle:
          return cycle
    stack.pop()
    state[u] = 2
    return None

  for u in sorted(graph):
    if u not in state:
      cycle = dfs(u)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  cycle = _find_cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detector_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_models_know_nothing_of_jaxinterp():
  graph = _graph()
  bad = {m: sorted(d for d in deps if not d.startswith("jaxinterp.models"))
         for m, deps in graph.items() if m.startswith("jaxinterp.models")}
  assert not {m: d for m, d in bad.items() if d}


def _layout_files() -> dict[str, pathlib.Path]:
  """Every .py file under LAYOUT_DIRS, by its path relative to the repository root."""
  return {str(p.relative_to(ROOT)): p
          for d in LAYOUT_DIRS for p in sorted((ROOT / d).rglob("*.py"))}


def _n_lines(path: pathlib.Path) -> int:
  return len(path.read_text().splitlines())


def test_module_sizes():
  sizes = {rel: _n_lines(p) for rel, p in _layout_files().items()}
  over_soft = {rel: n for rel, n in sorted(sizes.items()) if n > SOFT_LINES}
  over_hard = {rel: n for rel, n in over_soft.items() if n > MAX_LINES}
  problems = []
  if over_hard:
    problems.append(f"modules over {MAX_LINES} lines: {over_hard}")
  if len(over_soft) > MAX_OVER_SOFT:
    problems.append(f"{len(over_soft)} modules over {SOFT_LINES} lines (at most {MAX_OVER_SOFT}): "
                    f"{over_soft}")
  assert not problems, "; ".join(problems)


def test_experiments_are_thin():
  too_long = {str(p.relative_to(ROOT)): _n_lines(p)
              for p in sorted((ROOT / "experiments").glob("*.py"))}
  too_long = {rel: n for rel, n in too_long.items() if n > MAX_EXPERIMENT_LINES}
  assert not too_long, f"experiments/ files over {MAX_EXPERIMENT_LINES} lines: {too_long}"


def test_few_root_modules():
  root = sorted(p.name for p in (ROOT / "jaxinterp").glob("*.py"))
  assert len(root) <= MAX_ROOT_MODULES, (
      f"{len(root)} modules at the root of jaxinterp/ (at most {MAX_ROOT_MODULES}): {root}")


def test_readme_is_a_front_page():
  n = _n_lines(ROOT / "README.md")
  assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def _function_level_imports(path: pathlib.Path, rel: str) -> list[str]:
  """`rel:line: import` for each import of a project module (PROJECT_PACKAGES, or relative) that
  is not at module level: inside a function, lambda or class body. `if TYPE_CHECKING:` blocks are
  skipped; third-party lazy imports (torch, transformers, tracr, ...) are allowed."""
  tree = ast.parse(path.read_text(), str(path))
  found = []

  def visit(node, nested):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      for child in node.orelse:
        visit(child, nested)
      return
    if nested and isinstance(node, (ast.Import, ast.ImportFrom)):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        names = [node.module or ""]
      relative = isinstance(node, ast.ImportFrom) and node.level > 0
      if relative or any(n.split(".")[0] in PROJECT_PACKAGES for n in names):
        found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                        ast.ClassDef))
    for child in ast.iter_child_nodes(node):
      visit(child, inner)

  visit(tree, False)
  return found


def test_project_imports_at_module_top():
  found = [f for rel, p in _layout_files().items() for f in _function_level_imports(p, rel)]
  assert not found, ("imports of project modules inside a function (move them to the module "
                     "top):\n" + "\n".join(found))


def test_function_level_import_detector(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("from typing import TYPE_CHECKING\nimport jaxinterp\nif TYPE_CHECKING:\n  from "
                  "jaxinterp import tasks\ndef f():\n  import torch\n  if TYPE_CHECKING:\n    "
                  "from jaxinterp import runtime\n  from jaxinterp.tasks import metrics\n  def "
                  "g():\n    from . import sibling\n    import models.transformer\nclass C:\n  "
                  "from experiments import cli\n")
  assert _function_level_imports(path, "m.py") == [
      "m.py:9: from jaxinterp.tasks import metrics", "m.py:11: from . import sibling",
      "m.py:12: import models.transformer", "m.py:14: from experiments import cli"]


def test_registry_holds_every_method_module():
  """Each method module's Method is registered under its own name, and the registry drives the
  binaries' --method choices."""
  from jaxinterp import attribution as A
  from jaxinterp.attribution import base
  for name, m in A.METHODS.items():
    assert isinstance(m, base.Method) and m.name == name and m.description
    assert issubclass(m.options, base.Options)
    assert A.get_method(name) is m
  with pytest.raises(A.AttributionError, match="unknown method 'nope'.*EAP-IG-inputs"):
    A.get_method("nope")


def test_installed_packages_match_the_directories():
  """pyproject lists every package under its installed name, and maps models/ and experiments/ into
  jaxinterp (so no generic top-level name is installed)."""
  import tomllib
  conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  dirs = {ROOT / "jaxinterp": "jaxinterp", **{ROOT / d: p for d, p in PACKAGES.items()
                                               if d != "benchmarks"}}
  expected = set()
  for directory, pkg in dirs.items():
    for init in directory.rglob("__init__.py"):
      rel = init.parent.relative_to(directory).parts
      expected.add(".".join((pkg,) + rel))
  assert set(conf["packages"]) == expected
  assert all(p.startswith("jaxinterp") for p in conf["packages"])
  assert conf["package-dir"] == {"jaxinterp.models": "models",
                                 "jaxinterp.experiments": "experiments"}


def test_a_users_own_models_package_does_not_break_jaxinterp(tmp_path):
  """The issue's scenario: a project with its own `models` and `experiments` packages first on
  sys.path (its working directory) still loads the bundled model; the console scripts are
  installed."""
  for name in ("models", "experiments"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("WHO = 'user'\n")
  code = ("import models, experiments\nfrom jaxinterp.groundtruth import toy\nm = "
          "toy.load_toy()\nfrom jaxinterp.experiments import scripts\nprint(models.WHO, "
          "experiments.WHO, m.cfg.n_layers, len(scripts.SCRIPTS))\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                     env=dict(env, JAX_PLATFORMS="cpu"), timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split()[:3] == ["user", "user", "2"] and r.stderr.strip() == ""
  from importlib import metadata
  scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
             if e.name.startswith("jaxinterp-")}
  assert scripts["jaxinterp-find-circuit"] == "jaxinterp.experiments.scripts:find_circuit"
  from jaxinterp.experiments import scripts as installed
  assert set(scripts) == set(installed.SCRIPTS)
