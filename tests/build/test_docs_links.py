"""README.md stays short, and every relative link of README.md and docs/**/*.md points to a file that
exists (and, into a Markdown file, to a heading that exists)."""
import os
import re

import pytest

from helpers import REPO_ROOT, markdown_files, markdown_prose, read_markdown

README_MAX_LINES = 300

# Pages other branches write (they arrive when the lead merges them); until then a link to one of these
# that does not exist yet is reported as a skip, not a failure. The lead removes this exception after the
# merge. Every other missing target fails.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def links(rel: str) -> list:
    text = markdown_prose(read_markdown(rel))
    return LINK.findall(text) + REFERENCE.findall(text)


def heading_anchors(rel: str) -> set:
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped, spaces
    to hyphens, -1, -2, ... for repeats."""
    seen, anchors = {}, set()
    text = markdown_prose(read_markdown(rel), keep_code_spans=True)
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_readme_is_short():
    lines = read_markdown("README.md").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail "
                                       "into a page under docs/ and link it")


@pytest.mark.parametrize("rel", markdown_files())
def test_relative_links_resolve(rel):
    broken = []
    for target in links(rel):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
        if not os.path.exists(os.path.join(REPO_ROOT, resolved)):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor.lower() not in heading_anchors(resolved):
            broken.append(f"{target} (no such heading in {resolved})")
    assert not broken, f"{rel} links to what does not exist: {broken}"
