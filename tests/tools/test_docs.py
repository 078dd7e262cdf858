"""The documentation: a short README, links that resolve, no section lost, the quickstart unchanged.

README.md holds what the project is, the quickstart, the one-screen API, the runtimes table and links;
everything else lives in docs/*.md and benchmarks/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 250

# The top-level (##) sections of README.md before it was split into docs/ (commit 6f76574).
FORMER_README_SECTIONS = [
    "Quickstart",
    "Python API",
    "Layout",
    "Costs",
    "Runtimes",
    "Security",
    "Cross-device (Beehive)",
    "Data, models, and the strategy benchmark",
    "Client memory: principal-width activations",
    "Benchmarks",
    "Other methods: layer-wise learning, FedGKT, SuperFed",
    "Fidelity: does PriSM's claim hold?",
    "Tests",
]

# The quickstart's code block, literally: the same two commands .ci/run invokes.
QUICKSTART_LINES = [
    "bash run/setup.sh                  # creates .venv, installs everything, runs the default job (~1 min)",
    ".venv/bin/python -m pytest -q      # the test suite",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    files = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.exists()]


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def headings(path: Path) -> list[str]:
    return [m.group(2) for line in prose_lines(path) if (m := _HEADING.match(line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped but hyphens, spaces and underscores
    (GitHub keeps word characters), spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the file's headings (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not _EXTERNAL.match(target):
                links.append(target)
    return links


def test_slug_follows_github():
    assert slug("Fidelity: does PriSM's claim hold?") == "fidelity-does-prisms-claim-hold"
    assert slug("Which layers are factorized (`prism_args: rule`)") == "which-layers-are-factorized-prism_args-rule"
    assert slug("Cross-device (Beehive)") == "cross-device-beehive"
    assert slug("Data, models, and the strategy benchmark") == "data-models-and-the-strategy-benchmark"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move details into docs/"


def test_doc_files_exist():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    for name in ("README.md", "benchmarks/README.md", "docs/security.md", "docs/runtimes.md", "docs/layout.md"):
        assert name in names


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    broken = []
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        dest = (doc.parent / target).resolve() if target else doc
        if not dest.exists():
            broken.append(f"{link}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{link}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_former_readme_section_still_has_a_home():
    found = {h for f in doc_files() for h in headings(f)}
    missing = [s for s in FORMER_README_SECTIONS if s not in found]
    assert not missing, f"sections of the former README found nowhere in README.md, docs/ or benchmarks/README.md: {missing}"


def readme_section(title: str) -> list[str]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def test_quickstart_holds_exactly_the_two_commands():
    section = readme_section("Quickstart")
    opening = section.index("```bash")
    closing = section.index("```", opening + 1)
    block = [line for line in section[opening + 1:closing] if line.strip()]
    assert block == QUICKSTART_LINES
    # The same commands CI runs: .ci/run invokes them verbatim, in this order.
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    commands = [line.split("#", 1)[0].strip() for line in block]
    assert commands == ["bash run/setup.sh", ".venv/bin/python -m pytest -q"]
    assert all(c in ci for c in commands)
    assert ci.index(commands[0]) < ci.index(commands[1])
    assert (ROOT / "run" / "setup.sh").is_file()
