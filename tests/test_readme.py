"""The README is a front page that works: its Quickstart holds exactly two commands, its API
example runs and prints what it says, the commands and flags it names exist, it stays short, and
every link in it and in docs/ resolves (anchors included). The docs' Python examples run too."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# absl's own flags, which no binary defines itself.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity"}


def _readme() -> str:
  return README.read_text()


def _code_blocks(text: str, lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _run(block: str, name: str) -> tuple[str, dict]:
  out, scope = io.StringIO(), {}
  with contextlib.redirect_stdout(out):
    exec(compile(block, name, "exec"), scope)  # the project's own example code
  return out.getvalue(), scope


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_quickstart_has_two_commands():
  m = re.search(r"## Quickstart\s*```bash\n(.*?)```", _readme(), re.S)
  lines = [line for line in m.group(1).splitlines()
           if line.strip() and not line.strip().startswith("#")]
  assert len(lines) == 2
  assert "experiments.find_circuit" in lines[0] and "pip install" in lines[0]
  assert "pytest" in lines[1]


def test_readme_is_a_front_page():
  n = len(_readme().splitlines())
  assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def test_api_example_runs():
  block = re.search(r"## API\s.*?```python\n(.*?)```", _readme(), re.S).group(1)
  out, scope = _run(block, "README.md")
  assert out.strip().splitlines()[-1] == "19 0.846"  # the Quickstart's circuit, as printed there
  assert "faithfulness 0.846" in _readme() and "19 edges" in _readme()
  assert scope["scores"].shape == (11, 27)


def test_links_resolve():
  """Every relative link of the README and of docs/*.md names an existing file (and heading)."""
  bad = []
  for page in [README, *sorted(DOCS.glob("*.md"))]:
    for target in LINK.findall(page.read_text()):
      if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
        continue
      file, _, anchor = target.partition("#")
      path = (page.parent / file).resolve() if file else page
      if not path.exists():
        bad.append(f"{page.name}: {target} (no such file)")
      elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
        bad.append(f"{page.name}: {target} (no such heading)")
  assert not bad, "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
  linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(_readme())}
  pages = sorted(DOCS.glob("*.md"))
  assert pages, "docs/ has no pages"
  assert not [p.name for p in pages if p.resolve() not in linked]


def test_readme_commands_exist():
  """`python -m experiments.X` modules, `jaxinterp-*` console scripts and `--flags` it names."""
  text = _readme()
  modules = set(re.findall(r"python -m experiments\.(\w+)", text))
  assert "find_circuit" in modules
  assert not [m for m in modules if not (ROOT / "experiments" / f"{m}.py").exists()]
  scripts = set(re.findall(r"^(jaxinterp-[\w-]+) = ", (ROOT / "pyproject.toml").read_text(), re.M))
  named = set(re.findall(r"`(jaxinterp-[\w-]+)`", text))
  assert scripts and named == scripts, named ^ scripts
  sources = "".join(p.read_text() for p in [*(ROOT / "experiments").glob("*.py"),
                                            *(ROOT / "jaxinterp").rglob("*.py")])
  # the flags named in the README and in the command-line page
  flags = set(re.findall(r"`--(\w+)", text + (DOCS / "cli.md").read_text())) - ABSL_FLAGS
  assert flags, "the README names no flag"

  def defined(name: str) -> bool:  # by name (DEFINE_*("name", ...)) or as an options field
    return bool(re.search(rf'"{name}"|^\s+{name}\s*:', sources, re.M))

  missing = [f for f in sorted(flags)
             if not defined(f) and not (f.startswith("no") and defined(f[2:]))]
  assert not missing, f"flags named in README.md or docs/cli.md that no binary defines: {missing}"


def _doc_examples() -> list:
  out = []
  for page in sorted(DOCS.glob("*.md")):
    for i, block in enumerate(_code_blocks(page.read_text(), "python")):
      if "..." in block:  # a template to fill in (contributing.md's method skeleton)
        continue
      slow = "train_interventions" in block or "attribute_positions" in block
      out.append(pytest.param(page.name, block, id=f"{page.stem}-{i}",
                              marks=[pytest.mark.slow] if slow else []))
  return out


@pytest.mark.parametrize("page,block", _doc_examples())
def test_docs_examples_run(page, block):
  out, _ = _run(block, f"docs/{page}")
  expected = re.findall(r"#\s*([^#\n]+)$", block.strip().splitlines()[-1])
  if block.strip().splitlines()[-1].startswith("print(") and expected:
    assert out.strip().splitlines()[-1] == expected[0].strip()
