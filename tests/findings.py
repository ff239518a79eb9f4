"""The discharge record: test outcomes turned into falsifier verdicts, and ``findings.json``.

Verdicts are derived from outcomes by one rule, most damning first (see ``combine``): a
refuted claim outweighs a skip, a skip outweighs a test that never ran, and ``PASS`` is left
only when every bound test ran and passed. The record is built from what the run saw; the
printed summary is rendered from the record, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.contract_schema import Contracts, Falsifier, LoadedContract

FINDINGS_SCHEMA = "qwen3-moe-serve/findings/1"

Verdict = Literal["PASS", "FAIL", "SKIPPED", "NOT_RUN"]
Outcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed", "not_run"]
Measurement = float | int | str | bool

VERDICTS: tuple[Verdict, ...] = ("FAIL", "SKIPPED", "NOT_RUN", "PASS")
"""Every verdict, most damning first: the first one any bound test earns is the verdict."""

_VERDICT_OF: dict[Outcome, Verdict] = {
    "failed": "FAIL",
    "error": "FAIL",
    "xfailed": "FAIL",  # the test failed as its marker expected: the claim is still refuted
    "skipped": "SKIPPED",
    "not_run": "NOT_RUN",
    "xpassed": "PASS",
    "passed": "PASS",
}
# Which outcome of a test's phases (setup, call, teardown) stands for the whole test.
_PHASE_PRECEDENCE: tuple[Outcome, ...] = (
    "failed",
    "error",
    "xfailed",
    "skipped",
    "xpassed",
    "passed",
)


@dataclass
class BoundTest:
    """A collected test that names at least one falsifier, and what happened to it."""

    nodeid: str
    falsifies: tuple[str, ...]
    outcome: Outcome = "not_run"
    skip_reason: str | None = None
    deselected: bool = False
    duration_s: float = 0.0
    model_paths: set[str] = field(default_factory=set)
    measurements: dict[str, Measurement] = field(default_factory=dict)
    thresholds_read: dict[str, float] = field(default_factory=dict)

    def record_phase(self, report: pytest.TestReport) -> None:
        """Fold one phase's report into the test's outcome (the worst phase wins)."""
        self.duration_s += report.duration
        if report.when != "call" and report.passed:
            return
        outcome: Outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif report.skipped:
            outcome = "skipped"
            if isinstance(report.longrepr, tuple):
                self.skip_reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        else:
            outcome = "passed"
        current = self.outcome
        if current == "not_run" or (
            _PHASE_PRECEDENCE.index(outcome) < _PHASE_PRECEDENCE.index(current)
        ):
            self.outcome = outcome

    @property
    def name(self) -> str:
        """The node id without its file: ``test_x[param]``."""
        return self.nodeid.rpartition("::")[2]

    @property
    def verdict(self) -> Verdict:
        return _VERDICT_OF[self.outcome]


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """The most damning verdict among ``verdicts``; nothing at all is ``NOT_RUN``."""
    present = set(verdicts)
    return next((v for v in VERDICTS if v in present), "NOT_RUN")


@dataclass(frozen=True)
class RunFacts:
    """The run around the tests: how it was invoked and what it ran on."""

    created: str
    exit_status: int
    args: Sequence[str]
    whole_tree: bool
    duration_s: float
    problems: Sequence[str]
    real_model_path: str | None
    host: Mapping[str, Any]
    engine: Mapping[str, Any]
    models: Mapping[str, Mapping[str, Any]]
    """Facts per model file, keyed by path."""


def _falsifier_entry(
    falsifier: Falsifier, tests: Sequence[BoundTest], facts: RunFacts
) -> dict[str, Any]:
    verdict = combine(t.verdict for t in tests)
    if not tests:
        reason = "no bound test was collected"
    elif verdict == "FAIL":
        reason = "refuted by " + ", ".join(t.name for t in tests if t.verdict == "FAIL")
    elif verdict == "SKIPPED":
        skipped = [t for t in tests if t.verdict == "SKIPPED"]
        reasons = "; ".join(dict.fromkeys(str(t.skip_reason) for t in skipped))
        reason = f"{len(skipped)} of {len(tests)} bound tests skipped: {reasons}"
    elif verdict == "NOT_RUN":
        unrun = [t for t in tests if t.verdict == "NOT_RUN"]
        reason = f"{len(unrun)} of {len(tests)} bound tests not run (deselected or interrupted)"
    elif not facts.whole_tree:
        verdict = "NOT_RUN"
        reason = "only part of the test tree was collected; bound tests outside it did not run"
    else:
        reason = f"all {len(tests)} bound tests passed"
    names = {path: facts.models[path]["name"] for t in tests for path in t.model_paths}
    return {
        "id": falsifier.id,
        "verdict": verdict,
        "reason": reason,
        "claim": falsifier.claim,
        "thresholds": dict(falsifier.thresholds),
        "models": sorted(set(names.values())),
        "tests": [
            {
                "nodeid": t.nodeid,
                "outcome": t.outcome,
                **({"skip_reason": t.skip_reason} if t.skip_reason else {}),
                **({"deselected": True} if t.deselected else {}),
                "duration_s": round(t.duration_s, 4),
                "models": sorted(names[p] for p in t.model_paths),
                "thresholds_read": dict(t.thresholds_read),
                "measurements": dict(t.measurements),
            }
            for t in tests
        ],
    }


def _contract_entry(
    loaded: LoadedContract, tests: Sequence[BoundTest], facts: RunFacts, root: Path
) -> dict[str, Any]:
    contract = loaded.contract
    falsifiers = [
        _falsifier_entry(f, [t for t in tests if f.id in t.falsifies], facts)
        for f in contract.falsifiers
    ]
    path = loaded.path.relative_to(root) if loaded.path.is_relative_to(root) else loaded.path
    return {
        "id": contract.id,
        "version": contract.version,
        "file": str(path),
        "verdict": combine(f["verdict"] for f in falsifiers),
        "falsifiers": falsifiers,
    }


def build_findings(
    contracts: Contracts, tests: Sequence[BoundTest], facts: RunFacts, root: Path
) -> dict[str, Any]:
    """The ``findings.json`` document."""
    entries = [_contract_entry(lc, tests, facts, root) for lc in contracts.loaded]
    verdicts = [f["verdict"] for c in entries for f in c["falsifiers"]]
    gpu_used = any(m["gpu_offload"] for m in facts.models.values())
    return {
        "schema": FINDINGS_SCHEMA,
        "created": facts.created,
        "run": {
            "exit_status": facts.exit_status,
            "args": list(facts.args),
            "collection": "whole tree" if facts.whole_tree else "partial",
            "duration_s": round(facts.duration_s, 2),
            "contract_problems": list(facts.problems),
            "real_model": facts.real_model_path,
        },
        "environment": {
            **facts.host,
            **facts.engine,
            "gpu_offload_used": gpu_used,
            "cuda_used": gpu_used and bool(facts.engine.get("cuda_build")),
        },
        "models": {m["name"]: dict(m) for m in facts.models.values()},
        "summary": {v: verdicts.count(v) for v in VERDICTS},
        "contracts": entries,
    }


def _measurements(test: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in test["measurements"].items()
    )


def summary_lines(findings: Mapping[str, Any]) -> list[tuple[str, Verdict | None]]:
    """The terminal summary, with the verdict that colours each line (``None``: plain).

    One line per contract; one per falsifier that did not pass (falsifiers with no collected
    test, as in a run of one file, share a line); the measurements of each test that recorded
    some; and the models and engine the evidence came from.
    """
    lines: list[tuple[str, Verdict | None]] = []
    measured: set[str] = set()
    for contract in findings["contracts"]:
        falsifiers = contract["falsifiers"]
        verdicts = [f["verdict"] for f in falsifiers]
        tally = ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS if v in verdicts)
        head = f"{contract['verdict']:<8} {contract['id']} {contract['version']} ({tally})"
        lines.append((head, contract["verdict"]))
        uncollected = [f["id"].removeprefix(contract["id"]) for f in falsifiers if not f["tests"]]
        if uncollected:
            lines.append((f"  {'NOT_RUN':<8} no test collected: {', '.join(uncollected)}", None))
        for falsifier in falsifiers:
            if falsifier["verdict"] != "PASS" and falsifier["tests"]:
                text = f"  {falsifier['verdict']:<8} {falsifier['id']}: {falsifier['reason']}"
                lines.append((text, falsifier["verdict"]))
            for test in falsifier["tests"]:
                if test["measurements"] and test["nodeid"] not in measured:
                    measured.add(test["nodeid"])
                    name = test["nodeid"].rpartition("::")[2]
                    lines.append((f"  {'':<8} {name}: {_measurements(test)}", None))
    env = findings["environment"]
    models = ", ".join(
        f"{name} ({m['architecture']}, sha256 {m['sha256_prefix']}, gpu_offload={m['gpu_offload']})"
        for name, m in findings["models"].items()
    )
    engine = f"llama-cpp-python {env['llama_cpp_python']}, cuda_used={env['cuda_used']}"
    lines.append((f"models: {models or 'none'}; {engine}", None))
    return lines
