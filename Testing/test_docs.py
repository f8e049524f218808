"""The documentation a reader follows: the README stays a front page, every relative link and
``#anchor`` in ``README.md`` and ``docs/`` resolves (as GitHub renders them), the commands the
pages show are ones our parsers accept, the engine names they cite exist, and the README's Python
example runs as written.

Everything but the example is cheap (no model); the example is one short 3D propagation.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 400

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
FILE_NAME = re.compile(r"\.(py|json|csv|png|md|toml|txt|pth|nrrd)\b")
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def _blocks(text: str) -> Iterator[Tuple[bool, str, str]]:
    """``(in_code, info, line)`` for each line; ``info`` is the open fence's language."""
    fence, info = None, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence, info = m.group(1), line.strip()[3:].strip()
            continue
        if m and line.strip().startswith(fence):
            fence, info = None, ""
            continue
        yield fence is not None, info, line


def _prose(text: str) -> List[str]:
    """The lines outside fenced code, with inline code spans blanked (a link in code is no link)."""
    return [re.sub(r"`[^`]*`", lambda m: "`" + " " * (len(m.group(0)) - 2) + "`", line)
            for in_code, _, line in _blocks(text) if not in_code]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links reduced to their text, markup dropped),
    lower case, every character but letters, digits, ``_``, ``-`` and spaces removed, spaces to
    ``-`` (github-slugger)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every ``#anchor`` a page has: its headings' slugs (repeats get ``-1``, ``-2``, ...) and
    explicit ``<a name=...>`` / ``id=...``."""
    found: Set[str] = set()
    seen: Dict[str, int] = {}
    for in_code, _, line in _blocks(path.read_text(encoding="utf-8")):
        if in_code:
            continue
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> Iterator[str]:
    for line in _prose(path.read_text(encoding="utf-8")):
        yield from (m.group(2) for m in LINK.finditer(line))
        yield from HTML_LINK.findall(line)


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/user-guide.md", "docs/evaluation.md", "docs/performance.md",
            "docs/decisions.md", "docs/architecture.md"} <= names


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the front page keeps to {README_MAX_LINES}"
    # The two commands, as CI runs the second one (.ci/run).
    code = [line for in_code, _, line in _blocks(text) if in_code]
    assert any(line.startswith("make demo ") for line in code) and any(line.startswith("make test ") for line in code)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # What a newcomer looks for: install in Slicer, the demo and the tests, where to read more.
    for heading in ("Install in 3D Slicer", "The two commands", "Documentation"):
        assert f"## {heading}" in text, heading


def test_github_slug_rule():
    assert github_slug("What box prompts can give at best (`--modes per-slice`, `per-part`)") == \
        "what-box-prompts-can-give-at-best---modes-per-slice-per-part"
    assert github_slug("The annotator's loop, measured") == "the-annotators-loop-measured"
    assert github_slug("Fine-tuning (MedSAMTraining)") == "fine-tuning-medsamtraining"
    assert github_slug("Why `--no-deps` for the weights wheel") == "why---no-deps-for-the-weights-wheel"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path_part = path_part.split("?")[0]
        dest = (page.parent / path_part).resolve() if path_part else page
        if ROOT.resolve() not in (dest, *dest.parents):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT.resolve())}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _commands(program: str) -> Iterator[Tuple[Path, List[str]]]:
    """Each ``program ...`` command in the pages' shell blocks, as argv after the program (line
    continuations joined, comments and leading ``VAR=value`` assignments dropped)."""
    for page in PAGES:
        joined, lines = "", []
        for in_code, info, line in _blocks(page.read_text(encoding="utf-8")):
            if not (in_code and info in ("bash", "sh", "shell")):
                continue
            joined += line
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            lines.append(joined)
            joined = ""
        for line in lines:
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words and Path(words[0]).name == program:
                yield page, words[1:]


@pytest.mark.parametrize("program, module", [("medsam-slicer", "MedSAMSlicerLib.cli"),
                                             ("medsam-train", "MedSAMSlicerLib.training.cli")])
def test_the_commands_shown_are_accepted(program, module, capsys):
    """Every ``medsam-slicer`` / ``medsam-train`` command the pages show parses with the real
    parser (its subcommand and options exist and take the values shown)."""
    parser = importlib.import_module(module).build_parser()
    commands = list(_commands(program))
    assert commands, f"no {program} command in the pages"
    refused = []
    for page, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                refused.append(f"{page.relative_to(ROOT)}: {program} {' '.join(argv)}: "
                               f"{capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not refused, "\n".join(refused)


def _engine_names() -> Iterator[Tuple[Path, str]]:
    """``module.Name[.attr]`` in the pages' inline code where ``module`` is an engine module."""
    engine = ROOT / "MedSAMSlicer" / "MedSAMSlicerLib"
    modules = {p.stem for p in engine.glob("*.py")} | {p.name for p in engine.iterdir() if (p / "__init__.py").is_file()}
    for page in PAGES:
        for in_code, _, line in _blocks(page.read_text(encoding="utf-8")):
            if in_code:
                continue
            for span in re.findall(r"`([^`]+)`", line):
                m = re.match(r"^(?:MedSAMSlicerLib\.)?([a-z_]+)((?:\.[A-Za-z_]\w*)+)", span)
                if m and m.group(1) in modules and not FILE_NAME.search(span):
                    yield page, m.group(1) + m.group(2)


def test_the_engine_names_the_pages_cite_exist():
    """``segmenter.Segmenter``, ``review.DoubtRule``, ``preprocessing.Window.automatic``, ...: a
    name the docs send readers to is importable under that name (renames must update the docs)."""
    missing = []
    names = sorted(set(_engine_names()))
    assert len(names) > 20, names
    for page, dotted in names:
        module_name, *attrs = dotted.split(".")
        obj = importlib.import_module(f"MedSAMSlicerLib.{module_name}")
        for i, attr in enumerate(attrs):
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
                continue
            try:  # a submodule (evaluation.loop)
                obj = importlib.import_module(f"MedSAMSlicerLib.{module_name}." + ".".join(attrs[: i + 1]))
            except ImportError:
                missing.append(f"{page.relative_to(ROOT)}: {dotted}")
                break
    assert not missing, "\n".join(missing)


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's 'From Python' section has no python block"
    return blocks[0]


def test_the_readme_python_example_runs(tmp_path, monkeypatch, labels):
    """The example, run as written from a clone's root (here a folder that has the repository's
    ``Testing/``), segments the gallbladder, and the correction does what the README says."""
    from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd
    from MedSAMSlicerLib.metrics import dice

    (tmp_path / "Testing").symlink_to(ROOT / "Testing", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(_readme_python_example(), str(ROOT / "README.md"), "exec"), namespace)

    gallbladder = labels == 4
    first, fixed = dice(namespace["result"].mask, gallbladder), dice(namespace["fixed"].mask, gallbladder)
    print(f"README example: gallbladder 3D Dice {first:.3f} -> {fixed:.3f} after the correction")
    assert first >= 0.85 and fixed >= 0.92 and fixed > first
    assert namespace["result"].z_extent[0] < 84 <= namespace["fixed"].z_extent[0]
    written = read_seg_nrrd(tmp_path / "gallbladder.seg.nrrd")
    assert [s.name for s in written.segments] == ["gallbladder"]
    assert written.mask_kji(written.segments[0]).sum() == namespace["fixed"].mask.sum()
