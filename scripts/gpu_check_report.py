#!/usr/bin/env python3
"""Write gpu_check.json from what scripts/gpu_check.sh recorded so far.

    python scripts/gpu_check_report.py WORK_DIR OUT_FILE

WORK_DIR holds ``steps.tsv`` (step, status, seconds, note) and ``facts.tsv`` (key, value), both
appended by the shell script, and ``bench.json`` when the benchmark wrote one. The script calls
this after every step, so a run cut short by a time limit still leaves a report of what it did.
Standard library only: it runs before the check's own environment exists.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line]


def report(work: Path) -> dict[str, Any]:
    steps = [
        {"step": row[0], "status": row[1], "seconds": float(row[2]), "note": "\t".join(row[3:])}
        for row in _rows(work / "steps.tsv")
    ]
    facts: dict[str, str] = {}
    for row in _rows(work / "facts.tsv"):
        facts[row[0]] = "\t".join(row[1:])
    bench_file = work / "bench.json"
    bench: Any = None
    if bench_file.is_file():
        try:
            bench = json.loads(bench_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            bench = {"unparsed": bench_file.read_text(encoding="utf-8")[-2000:]}
    return {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ok": bool(steps) and all(step["status"] in {"ok", "skipped"} for step in steps),
        "steps": steps,
        "facts": facts,
        "bench": bench,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[2]).write_text(json.dumps(report(Path(argv[1])), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
