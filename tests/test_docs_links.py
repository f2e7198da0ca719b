"""Every relative link of README.md and docs/*.md resolves: `[text](path)` to an existing file or folder (relative to
the file holding the link), and `[text](path#anchor)` / `[text](#anchor)` to a heading of the target, slugged as
GitHub does (lowercase; punctuation dropped except hyphens, underscores and spaces; spaces become hyphens; a repeated
heading gets -1, -2, ...). http(s) and other URLs with a scheme are not checked (the tests run offline). Links inside
code blocks and code spans are not links."""

import re
import urllib.parse
from pathlib import Path

from conftest import ROOT

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()<>\s]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")

DOCS = ("demo.md", "scaling.md", "memory_and_speed.md", "data.md", "reliability.md", "evaluation.md",
        "architecture.md")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link in the prose of a markdown file."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for target in INLINE_LINK.findall(line):
            yield number, target
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            yield number, definition.group(1)


def broken_links(path: Path, root: Path) -> list[str]:
    """One line per link of `path` that does not resolve inside `root`."""
    problems = []
    for number, target in links(path):
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(root)}:{number}: {target}"
        resolved = (path.parent / urllib.parse.unquote(file_part)).resolve() if file_part else path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and urllib.parse.unquote(anchor) not in anchors(resolved):
            problems.append(f"{where} (no heading #{anchor} in {resolved.relative_to(root.resolve())})")
    return problems


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def test_every_relative_link_resolves():
    files = markdown_files(ROOT)
    assert len(files) > 1, "no docs/*.md found"
    problems = [problem for path in files for problem in broken_links(path, ROOT)]
    assert problems == [], "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Real heading: (`--it`)!\n\n## Twice\n\n## Twice\n")
    (tmp_path / "README.md").write_text(
        "# Intro\n\n"
        "[fine](docs/b.md) [fine anchor](docs/b.md#real-heading---it) [second](docs/b.md#twice-1) [self](#intro)\n"
        "[folder](docs/) ![image](docs/b.md) [web](https://example.com/nowhere.md#x) [mail](mailto:a@b.c)\n"
        "[broken link](docs/missing.md) and [broken anchor](docs/b.md#no-such-heading)\n"
        "`[in a code span](nowhere.md)`\n\n"
        "```\n[in a code block](nowhere.md)\n```\n\n"
        "[ref]: docs/gone.md\n")
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md:5: docs/missing.md (no such file)",
        "README.md:5: docs/b.md#no-such-heading (no heading #no-such-heading in docs/b.md)",
        "README.md:12: docs/gone.md (no such file)",
    ]
    assert broken_links(tmp_path / "docs" / "b.md", tmp_path) == []


def test_github_slugs():
    assert github_slug("Will it fit? The memory plan (`--dry_run`)") == "will-it-fit-the-memory-plan---dry_run"
    assert github_slug("λ: the paper's log-space update vs a PID Lagrangian") == (
        "λ-the-papers-log-space-update-vs-a-pid-lagrangian")
    assert github_slug("Memory of a PPO step (`benchmarks/ppo_step_memory.py`)") == (
        "memory-of-a-ppo-step-benchmarksppo_step_memorypy")
    assert github_slug("Licence, attribution, citation") == "licence-attribution-citation"


def test_the_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    targets = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    assert {f"docs/{name}" for name in DOCS} <= targets, "README does not link every doc"
