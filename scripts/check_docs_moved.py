"""Check that splitting the README into a front page and docs/ lost no measured figure.

Every line of the README at ``REV`` (default: the last commit before the split) that holds a digit
must be found in today's ``README.md`` or a page under ``docs/``:

- **verbatim**: the line's text (markdown links reduced to their text, emphasis and whitespace
  ignored) is in the new pages, or
- **moved form**: its numbers appear in the same order within a short stretch of the new pages
  (the sentence around them was reworded or got a link), listed for a reader to look at, or
- **missing**: neither; the script exits with status 1.

Run from the repository's root: ``python scripts/check_docs_moved.py [REV]``. A one-off check for
the documentation move (issue 24); it needs the git history.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REV = "07bf507"
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalise(text: str) -> str:
    """Markdown links to their text, no emphasis marks or table pipes, whitespace collapsed."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("**", "").replace("|", " ")
    return re.sub(r"\s+", " ", text).strip()


def numbers_in_order(numbers: List[str], corpus: str, window: int) -> bool:
    """Whether ``numbers`` occur in ``corpus`` in this order within ``window`` characters."""
    first = numbers[0]
    for start in (m.start() for m in re.finditer(r"(?<![\d.])" + re.escape(first) + r"(?![\d])", corpus)):
        stretch = corpus[max(0, start - window // 2): start + window]
        position = 0
        for number in numbers:
            found = re.search(r"(?<![\d.])" + re.escape(number) + r"(?![\d])", stretch[position:])
            if not found:
                break
            position += found.end()
        else:
            return True
    return False


def main(rev: str = DEFAULT_REV) -> int:
    old = subprocess.run(["git", "show", f"{rev}:README.md"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    corpus = normalise("\n".join(p.read_text(encoding="utf-8") for p in pages))
    verbatim, moved, missing = [], [], []
    for number, line in enumerate(old.splitlines(), 1):
        text = normalise(line)
        if not re.search(r"\d", text):
            continue
        if text in corpus:
            verbatim.append(number)
        elif numbers_in_order(NUMBER.findall(text), corpus, window=max(300, 3 * len(text))):
            moved.append((number, line))
        else:
            missing.append((number, line))
    print(f"{len(verbatim) + len(moved) + len(missing)} lines with a digit in README.md at {rev}: "
          f"{len(verbatim)} verbatim, {len(moved)} in a moved form, {len(missing)} missing")
    for title, rows in (("moved form (numbers in order nearby; read them):", moved), ("MISSING:", missing)):
        if rows:
            print(title)
            for number, line in rows:
                print(f"  {number}: {line.strip()}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
