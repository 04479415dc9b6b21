"""No stale reference: every repository path a docstring, comment, handout or docs page names exists, every
relative link in the Markdown files resolves (to a file, and to a heading when it names one), and every
'(page.md, "Heading")' citation names a heading that page has.

Only prose is read in Python files (comments and docstrings): code that builds paths is tested by running it.
"""

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

from scripts import ROOT

TOP_DIRS = ("llama_min", "lab", "docs", "tests", "benchmarks", "experiments", "data", "scripts", ".ci")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(re.escape(d) for d in TOP_DIRS)})/[\w./-]*\w)")
PY_NAME = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.py)\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"([\w/]+\.md), \"([^\"]+)\"")
# Files that other projects ship, named as such (not ours to hold).
OTHER_PROJECTS = {"convert_hf_to_gguf.py"}  # llama.cpp's converter
# Placeholders in a documented naming scheme: NN is a lab's number, topic its subject.
PLACEHOLDERS = {"NN": r"\d\d", "topic": r"\w+"}
# Outputs that a documented command writes (so they exist only after it ran).
GENERATED = {"lab/handout.json", "lab/starter", "data/cache"}  # lab/handout.py and its handout; train.py's tokenizer cache


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


FILES = tracked_files()
KNOWN = set(FILES) | {str(p) for f in FILES for p in Path(f).parents if str(p) != "."}
BASENAMES = {Path(f).name for f in FILES}


def prose(path: Path) -> str:
    """What a reader reads: a Markdown or TOML file whole; of a Python file its comments and docstrings."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return text
    parts = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node) or "")
    return "\n".join(parts)


def path_exists(name: str) -> bool:
    name = name.rstrip("/.")
    if name in KNOWN or name in GENERATED or any(k.startswith(name) for k in KNOWN):  # (a prefix: "lab/fixtures/lab01.{json,...}")
        return True
    pattern = re.escape(name)
    for placeholder, regex in PLACEHOLDERS.items():
        pattern = pattern.replace(placeholder, regex)
    return any(re.match(pattern, k) for k in KNOWN)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def headings(path: Path) -> set[str]:
    """The page's Markdown headings; a '# comment' line inside a fenced code block is not one."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            found.add(line.lstrip("#").strip())
    return found


READ = [f for f in FILES if f.endswith((".py", ".md", ".toml")) and not f.startswith("data/")]
MARKDOWN = [f for f in FILES if f.endswith(".md")]


@pytest.mark.parametrize("name", READ)
def test_every_path_named_in_prose_exists(name):
    text = prose(ROOT / name)
    missing = sorted({m for m in PATH.findall(text) if not path_exists(m)})
    missing += sorted({m for m in PY_NAME.findall(text) if m not in BASENAMES and m not in OTHER_PROJECTS})
    assert not missing, f"{name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("name", MARKDOWN)
def test_every_relative_link_resolves(name):
    page = ROOT / name
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in {slug(h) for h in headings(linked)}:
            broken.append(target)
    assert not broken, f"{name}: links that do not resolve: {broken}"


@pytest.mark.parametrize("name", READ)
def test_every_cited_heading_exists(name):
    """'docs/results.md, "How the default got there"': the page has that heading."""
    wrong = [f"{page}, {heading!r}" for page, heading in CITATION.findall(prose(ROOT / name))
             if (ROOT / page).is_file() and heading not in headings(ROOT / page)]
    assert not wrong, f"{name} cites headings that do not exist: {wrong}"


def test_the_checks_can_fail(tmp_path):
    """Negative controls: a stale path, a broken link and a renamed heading are each caught."""
    moved = "llama_min/" + "adapter.py"  # (built, so that no checker of the tree reads it as a stale path)
    assert not path_exists(moved) and path_exists("llama_min/peft/adapter.py")
    assert path_exists("lab/fixtures/labNN.json") and not path_exists("lab/fixtures/labNN.yaml")
    assert slug("How the default got there") == "how-the-default-got-there"
    assert slug("Early stopping on the word-task benchmark") in {slug(h) for h in headings(ROOT / "docs" / "results.md")}
    assert "How the default got here" not in headings(ROOT / "docs" / "results.md")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\n# a shell comment\n```\n## `--resume` and runs\n")
    assert headings(page) == {"Title", "`--resume` and runs"}
    assert slug("`--resume` and runs") == "--resume-and-runs"  # GitHub drops the backticks, keeps the hyphens


SUB_PACKAGES = sorted(p.parent.name for p in (ROOT / "llama_min").glob("*/__init__.py"))


@pytest.mark.parametrize("package", SUB_PACKAGES)
def test_each_sub_package_docstring_lists_its_files(package):
    """The module map of a sub-package is its docstring (README links there): every file is in it, so
    the map cannot drift from the tree."""
    directory = ROOT / "llama_min" / package
    doc = ast.get_docstring(ast.parse((directory / "__init__.py").read_text(encoding="utf-8"))) or ""
    missing = [p.name for p in sorted(directory.glob("*.py")) if p.name != "__init__.py"
               and not re.search(rf"(?<![\w.]){re.escape(p.name)}(?!\w)", doc)]
    assert not missing, f"llama_min/{package}/__init__.py's docstring does not list {missing}"
