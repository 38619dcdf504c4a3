"""Every comment, docstring and page cites what a reader of the repository has: a file that exists in the
repository, or a section of a docs page that exists. Scans every .py, .md and .yaml file and the Makefile;
in .py files only the comments and docstrings, since code may name files that a test creates."""

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "out", "runs"}

# Notes that are not part of the repository; naming one is always an error. Spelled in two pieces so that
# this file does not match itself.
FORBIDDEN = ("DESIGN" + ".md", "ref" + " §", "reference" + "/", "../" + "shared")

# Relative paths under these folders of the repository must exist (relative to the repository root).
# The parity fixtures' folder is listed too, so that a comment cannot cite them as if they were shipped.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|configs|assets|tests|fixtures)/[\w./-]*)")
# A bare file name of the kinds the repository is made of must name a file somewhere in it.
BARE_NAME = re.compile(r"(?<![\w./<>-])([\w-]+\.(?:py|md|yaml))\b")
# Markdown link targets in .md pages, resolved against the page's folder.
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A section citation: a docs page followed by one or more §N(.M) (a list or a range, e.g. "§3.1, §3.4",
# "§3.1–§3.3", "§2.2 and §2.3"). The page is named from the repository root, or by its bare name inside docs.
CITATION = re.compile(r"((?:docs/)?[\w.-]+\.md)((?:(?:\s|#|,|;|and|or|–|-)*§\d+(?:\.\d+)*)+)")

# Bare names that are not files of the repository, each for a stated reason. Names in capitals before the
# extension (CONFIG.yaml) are placeholders in usage lines and are not checked.
ALLOWED_NAMES = {
    "config.yaml",  # the resolved config that a run writes next to its checkpoints
    "eval_config.yaml",  # the resolved config that evaluate.py writes beside its metrics
    # files of the upstream repositories, named as the source of a fact
    "inference.py",  # microsoft/mineworld
    "data_loader.py", "xf.py",  # openai/Video-Pre-Training
}


def repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files; a walk of the tree (skipping SKIP_DIRS) without git."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.exists())


FILES = repo_files()
NAMES = {p.name for p in FILES}
SCANNED = [p for p in FILES if p.suffix in (".py", ".md", ".yaml") or p.name == "Makefile"]


def _sections(page: Path) -> set[str]:
    """The section numbers of a docs page: "1", "1.5" for headers "## 1 ..." and "## 1.5 ...". """
    return {m.group(1) for m in re.finditer(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", page.read_text(), re.M)}


def prose(path: Path, text: str) -> list[tuple[int, str]]:
    """(line number, text) of what a reader reads as prose: every line of a page, config or Makefile; the
    comments and the string statements (docstrings) of a .py file."""
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), 1))
    pieces = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
              if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            pieces += [(node.lineno + i, line) for i, line in enumerate(node.value.value.splitlines())]
    return sorted(pieces)


def problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    rel_path = path.relative_to(ROOT)
    # The private notes may not be named anywhere, code included.
    found = [f"{rel_path}:{n}: cites {bad!r}, which a reader of the repository does not have"
             for n, line in enumerate(text.splitlines(), 1) for bad in FORBIDDEN if bad in line]
    for n, line in prose(path, text):
        where = f"{rel_path}:{n}"
        for m in REPO_PATH.finditer(line):
            rel = m.group(1).rstrip(".-")
            if line[m.end():m.end() + 1] in ("<", "{", "*", "$", "%"):  # a template (clip_<N>.mp4, {a,b}, make's %)
                continue
            if (ROOT / rel).exists():
                continue
            found.append(f"{where}: {rel} does not exist in the repository")
        for m in BARE_NAME.finditer(line):
            name = m.group(1)
            if name not in NAMES and name not in ALLOWED_NAMES and not name.split(".")[0].isupper():
                found.append(f"{where}: {name} is not a file of the repository")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target = m.group(1).split("#")[0]
                if not target or re.match(r"[a-z]+:", target):  # an anchor or a URL
                    continue
                if not (path.parent / target).exists():
                    found.append(f"{where}: link target {target} does not exist")
        for m in CITATION.finditer(line):
            page = ROOT / m.group(1) if m.group(1).startswith("docs/") else path.parent / m.group(1)
            if not page.exists():
                continue  # reported above (REPO_PATH, BARE_NAME or MD_LINK)
            have = _sections(page)
            for sec in re.findall(r"§(\d+(?:\.\d+)*)", m.group(2)):
                if sec not in have:
                    found.append(f"{where}: {m.group(1)} has no section §{sec}")
    return found


@pytest.mark.parametrize("path", SCANNED, ids=[str(p.relative_to(ROOT)) for p in SCANNED])
def test_references_exist(path):
    found = problems(path)
    assert not found, "\n".join(found)


def test_reference_pages_exist():
    # The two reference pages the code cites by section, each with numbered sections.
    for name in ("formats", "conventions"):
        assert _sections(ROOT / "docs" / f"{name}.md"), f"the {name} page has no numbered sections"
