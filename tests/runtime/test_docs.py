"""The README and docs/ stay short, truthful about set-up, and free of dangling links."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
EXPORT_README = ROOT / "export" / "README.md"
MAX_README_LINES = 200
SETUP_COMMANDS = ["make demo", "make test"]

# [text](target) and reference definitions `[label]: target`; images too.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
# A file path of the library named in prose or code spans: `pbv_onnx/method/similarity.py`.
MODULE_PATH = re.compile(r"(?<![\w./-])((?:pbv_onnx|cli|export|bench|tests)/[\w./-]*\w\.(?:py|sh|md|json))")
FENCE = re.compile(r"^(```|~~~)")


def repository_files() -> list[Path]:
    """Files of the project: tracked or not ignored (git), else a walk without build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "models", "__pycache__", ".pytest_cache", ".hypothesis"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file()]


def prose(text: str) -> str:
    """Markdown without its fenced code blocks (a link-like string in a shell example is not a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (no scheme, not a bare #anchor), fragment dropped."""
    body = prose(text)
    targets = INLINE_LINK.findall(body) + REFERENCE_LINK.findall(body)
    out = []
    for t in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) or t.startswith("#"):
            continue
        out.append(t.split("#", 1)[0])
    return out


def section(text: str, heading: str) -> str:
    """The body of the level-2 section whose heading starts with `heading`, up to the next one."""
    match = re.search(rf"^## {re.escape(heading)}.*$", text, re.MULTILINE)
    assert match, f"README.md has no '## {heading}' section"
    rest = text[match.end() :]
    nxt = re.search(r"^## ", rest, re.MULTILINE)
    return rest[: nxt.start()] if nxt else rest


def fenced_commands(text: str) -> list[str]:
    """Command lines inside the fenced code blocks of `text`, comments and blank lines dropped."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            command = line.split("#", 1)[0].strip()
            if command:
                out.append(command)
    return out


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines, more than {MAX_README_LINES}"


def test_setup_is_exactly_make_demo_and_make_test():
    setup = section(README.read_text(encoding="utf-8"), "Set up")
    assert fenced_commands(setup) == SETUP_COMMANDS


def test_setup_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        target = command.split()[1]
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no '{target}' target"


@pytest.mark.parametrize("doc", [README, *DOCS, EXPORT_README], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    files = {p.resolve() for p in repository_files()}
    links = relative_links(doc.read_text(encoding="utf-8"))
    broken = [t for t in links if (doc.parent / t).resolve() not in files]
    assert not broken, f"{doc.relative_to(ROOT)}: links to no file of the repository: {broken}"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_source_files_exist(doc: Path):
    named = set(MODULE_PATH.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_no_reference_to_a_method_file_outside_the_repository():
    # The definitions live in docs/method.md; the upper-case name was a file outside the
    # repository. The needle is spelt in two parts so that this test does not find itself.
    needle = "METHOD" + ".md"
    hits = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not hits, f"references to {needle} (use docs/method.md): {hits}"


def test_link_helpers_find_what_they_should():
    text = (
        'See [a](docs/a.md#x), ![img](fig.png "t"), [web](https://x.org), [anchor](#top),\n'
        "[ref]: ../export/README.md\n```sh\necho [not](a-link.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "fig.png", "../export/README.md"]
    assert fenced_commands("x\n```sh\nmake demo   # builds\n\n# only a comment\nmake test\n```\n") == SETUP_COMMANDS
    assert MODULE_PATH.findall("`pbv_onnx/method/paths.py` and pbv_onnx.runtime") == ["pbv_onnx/method/paths.py"]
