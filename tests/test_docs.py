"""The words around the code stand alone: every file a reader is pointed to is in the repository (no notes kept
elsewhere), no issue number stands in for an explanation, every docs/ link and anchor resolves, and the README
stays short. Pure text checks: they run in a second."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300

# notes that were never part of the repository, by name or folder
OUTSIDE = re.compile(r"shared/design|\.\./shared|/work/|\b(?:dmd|wan21|perf|style)\.md\s*§")
# an issue, pull request or ticket number used as a reference: "issue 15", "issue #15", "issues 7-9", "#15", "PR 3"
ISSUE = re.compile(r"\b(?:issues?|PRs?|pull requests?|tickets?)[ _-]?#?\d+|(?<![\w&#/])#\d+\b", re.IGNORECASE)
MD_REF = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?[\w./-]*\w\.md)(#[\w-]+)?")
EXTERNAL = re.compile(r"\s+(?:at|in|of)\s+[\w-]+/[\w.-]+")   # "... .md at owner/repo": another repository's file


def files():
    """The checked texts: every project .py (root, bench/, tests/ but this file), config/*, README.md, docs/*.md,
    bench/*.md -> [repository-relative path]."""
    pats = ["*.py", "bench/*.py", "tests/*.py", "config/*", "README.md", "docs/*.md", "bench/*.md"]
    out = sorted({os.path.relpath(p, ROOT) for pat in pats for p in glob.glob(os.path.join(ROOT, pat))
                  if os.path.isfile(p)})
    return [p for p in out if p != os.path.join("tests", "test_docs.py")]


def hits(pattern, path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in pattern.finditer(text)]


def slug(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = open(path, encoding="utf-8").read()
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, re.MULTILINE)}


def resolve(ref, path):
    """A .md reference of file `path` -> the existing file it names (relative to the file's folder, then to the
    repository root), or None."""
    for base in (os.path.dirname(os.path.join(ROOT, path)), ROOT):
        cand = os.path.normpath(os.path.join(base, ref))
        if os.path.isfile(cand):
            return cand
    return None


def test_no_reference_outside_the_repository():
    bad = [h for p in files() for h in hits(OUTSIDE, p)]
    assert not bad, "references to notes outside the repository (write it into docs/ instead):\n" + "\n".join(bad)


def test_no_issue_numbers():
    bad = [h for p in files() for h in hits(ISSUE, p)]
    assert not bad, "issue numbers (say what is meant instead):\n" + "\n".join(bad)


def test_every_md_reference_and_anchor_resolves():
    """Each `name.md` or `docs/name.md#anchor` a file names exists in the repository, with that heading. The
    published model card's README.md (card.py, publish.py) is the run's own file: it resolves to the root one."""
    bad = []
    for p in files():
        text = open(os.path.join(ROOT, p), encoding="utf-8").read()
        for m in MD_REF.finditer(text):
            ref, anchor = m.group(1), m.group(2)
            if EXTERNAL.match(text, m.end()):   # a file of another public repository, named with it
                continue
            target = resolve(ref, p)
            line = text.count("\n", 0, m.start()) + 1
            if target is None:
                bad.append(f"{p}:{line}: {ref} does not exist")
            elif anchor and anchor[1:] not in anchors(target):
                bad.append(f"{p}:{line}: {ref}{anchor}: no such heading")
    assert not bad, "\n".join(bad)


def test_docs_links_point_at_files():
    """Markdown links of README.md and docs/ to other files of the repository resolve (relative to the file)."""
    bad = []
    for p in ["README.md", "bench/README.md"] + sorted(os.path.relpath(f, ROOT) for f in glob.glob(f"{ROOT}/docs/*.md")):
        text = open(os.path.join(ROOT, p), encoding="utf-8").read()
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)\s]*)?\)", text):
            ref = m.group(1)
            if re.match(r"[a-z]+://", ref):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(p), ref))):
                bad.append(f"{p}: ({ref}) does not exist")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    n = len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move detail into docs/"
