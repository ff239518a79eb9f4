"""A stranger's clone must pass ``make test`` with nothing beside the checkout.

Regression guard: the suite once read Qwen3's chat template from a ``shared/`` folder beside
the repository (one directory up, then ``shared/qwen3/chat_template.jinja``), which exists on
the developers' machines and nowhere else, so ``git clone … && make test`` failed for every
new user. Every file the project needs lives inside the repository (the template is packaged
in ``app/``, test data under ``tests/``); this test fails when a tracked file points outside
it again.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself.
_OUTSIDE = [
    re.escape(".." + "/shared"),
    re.escape("parents[" + "2]"),  # two levels above tests/: beside the checkout
    r"[\"']" + re.escape("/" + "work/"),  # the developers' machines' absolute paths
    re.escape('"' + 'shared" /'),
]
OUTSIDE_THE_REPO = re.compile("|".join(_OUTSIDE))


RECORDS = ROOT / "bench" / "results"
"""Measurements as recorded (they name where a run happened, and are never read as paths)."""


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = []
    for name in listed:
        path = ROOT / name.decode()
        if not name or not path.is_file() or path.suffix in {".png", ".gguf"}:
            continue
        if RECORDS not in path.parents:
            files.append(path)
    return files


def test_no_tracked_file_reads_outside_the_checkout() -> None:
    offenders = []
    for path in _tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_THE_REPO.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "files that reach outside the repository:\n" + "\n".join(offenders)


def test_the_guard_sees_what_it_guards_against() -> None:
    """The patterns match the forms that broke a fresh clone (else the test above is void)."""
    shared = '"' + 'shared"'
    broken = "Path(__file__).resolve().parents[" + f'2] / {shared} / "qwen3" / "template.jinja"'
    assert OUTSIDE_THE_REPO.search(broken)
    assert OUTSIDE_THE_REPO.search("cat .." + "/shared/qwen3/coder_chat_template.jinja")
    assert not OUTSIDE_THE_REPO.search('PACKAGED = ROOT / "app" / "qwen3_chat_template.jinja"')
