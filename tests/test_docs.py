"""The README and the manual in docs/: every relative link and #anchor resolves, the README keeps
the two set-up commands of a fresh machine (.ci/run runs the second). docs/generation.md's Python
example is run by tests/inference/test_decode.py."""

import re
from pathlib import Path

from conftest import ROOT

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    """The markdown with fenced code blocks and inline code removed."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(path: Path) -> set[str]:
    """The #anchors of a markdown file's headings, as GitHub makes them (a repeated one gets -1, -2)."""
    found: set[str] = set()
    for line in re.sub(r"```.*?```", "", path.read_text(), flags=re.S).split("\n"):
        heading = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = 0
            while (slug if n == 0 else f"{slug}-{n}") in found:
                n += 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", without_code(path.read_text())):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


def test_links_and_anchors_resolve():
    assert len(DOC_FILES) >= 8
    broken = {str(p.relative_to(ROOT)): b for p in DOC_FILES if (b := broken_links(p))}
    assert broken == {}


def test_link_check_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Two words\n\n[ok](#two-words) [ok](a.md#title) [bad](#nope) [bad](b.md) `[code](c.md)`\n"
    )
    assert broken_links(tmp_path / "a.md") == ["#nope (no such heading)", "b.md (no such file)"]


def test_readme_has_the_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    assert 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[plot]" && python train.py' in readme
    tests_command = (
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test,plot]" && python -m pytest tests'
    )
    assert tests_command in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet --no-compile -e ".[test,plot]"' in ci and "\npython -m pytest tests\n" in ci
