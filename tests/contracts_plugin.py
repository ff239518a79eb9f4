"""Pytest plugin: binds tests to contract falsifiers and writes a discharge record per run.

Tests say what they could refute with ``@pytest.mark.falsifies("<FALSIFIER_ID>", ...)``. After
collection the plugin checks the contracts and the bindings and stops the run (a usage error,
exit status 4, before any test runs) when a contract file does not validate, when a marker
names an unknown falsifier, or, when the whole test tree was collected, when a falsifier is
bound to no test. A run of one file or node id cannot see the bindings in files it did not
collect, so it checks only the markers it has; ``--contracts-complete`` forces the full check.
``-k``, ``-m`` and ``--deselect`` do not make a run partial: they act after collection, and the
check sees every collected test.

At the end of every run (``--collect-only`` excepted) the plugin writes the discharge record,
``findings.json`` (``--findings PATH``, else ``$QWEN3_MOE_FINDINGS``, else ``findings.json`` in
the rootdir), and prints a short summary of it; ``tests/findings.py`` says how verdicts are
derived. Tests read thresholds with the ``contract_threshold`` fixture and file measurements
with ``record_finding``.

The alternative rejected: contracts citing tests by name in prose, which nothing checks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.engine import ModelInfo
from tests.contract_schema import Contracts, check_bindings, load_contracts
from tests.findings import BoundTest, Measurement, RunFacts, build_findings, summary_lines
from tests.run_facts import engine_facts, host_facts, model_facts

MARKER = "falsifies"
FINDINGS_ENV = "QWEN3_MOE_FINDINGS"
REAL_MODEL_ENV = "QWEN3_MOE_GGUF_PATH"

RecordFinding = Callable[[str, Measurement], None]
ContractThreshold = Callable[[str, str], float]


@dataclass
class ContractRun:
    """What the plugin knows about one session (kept on ``config.stash``, never globally)."""

    contracts: Contracts
    findings_path: Path | None
    started: float = field(default_factory=time.monotonic)
    whole_tree: bool = False
    problems: list[str] = field(default_factory=list)
    tests: dict[str, BoundTest] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    findings: dict[str, Any] | None = None


_RUN = pytest.StashKey[ContractRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("contracts", "contract falsifiers and the findings file")
    group.addoption(
        "--contracts-dir",
        default=None,
        help="directory of contract YAML files (default: the contracts_dir ini value)",
    )
    group.addoption(
        "--findings",
        default=None,
        metavar="PATH",
        help=f"where to write the discharge record (default: ${FINDINGS_ENV}, else "
        "findings.json in the rootdir)",
    )
    group.addoption(
        "--contracts-complete",
        action="store_true",
        default=False,
        help="require every falsifier to be bound even when only part of the tree is collected",
    )
    parser.addini("contracts_dir", "directory of contract YAML files", default="contracts")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*falsifier_ids): the test can refute these contract falsifiers "
        "(tests/contracts_plugin.py)",
    )
    directory = config.getoption("contracts_dir") or config.getini("contracts_dir")
    contracts = load_contracts(config.rootpath / directory, config.rootpath)
    config.stash[_RUN] = ContractRun(contracts, _findings_path(config))


def _findings_path(config: pytest.Config) -> Path | None:
    if config.option.collectonly:
        return None  # a collection is not a run: keep the last discharge record
    chosen = config.getoption("findings") or os.environ.get(FINDINGS_ENV)
    if not chosen:
        return config.rootpath / "findings.json"
    return (config.invocation_params.dir / chosen).resolve()


def _collects_whole_tree(config: pytest.Config) -> bool:
    """Whether every test file was collected, so that an unbound falsifier is really unbound."""
    if config.getoption("contracts_complete"):
        return True
    for narrowing in ("lf", "stepwise", "ignore", "ignore_glob"):
        if config.getoption(narrowing, None):
            return False
    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        return True  # testpaths or the invocation directory: the whole tree
    given = [(config.invocation_params.dir / arg).resolve() for arg in config.args]
    roots = [(config.rootpath / p).resolve() for p in config.getini("testpaths")]
    return all(
        any(arg.is_dir() and (arg == root or arg in root.parents) for arg in given)
        for root in roots or [config.rootpath]
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Read every collected test's markers before ``-k``/``-m``/``--deselect`` drop any."""
    run = config.stash[_RUN]
    for item in items:
        ids: list[str] = []
        for marker in item.iter_markers(MARKER):
            if not marker.args or marker.kwargs:
                run.problems.append(f"{item.nodeid}: @{MARKER} takes falsifier ids and only them")
            for arg in marker.args:
                if isinstance(arg, str):
                    ids.append(arg)
                else:
                    run.problems.append(f"{item.nodeid}: @{MARKER} got {arg!r}, not an id")
        if ids:
            run.tests[item.nodeid] = BoundTest(item.nodeid, tuple(dict.fromkeys(ids)))


def pytest_deselected(items: Sequence[pytest.Item]) -> None:
    for item in items:
        test = item.config.stash[_RUN].tests.get(item.nodeid)
        if test is not None:
            test.deselected = True


def pytest_collection_finish(session: pytest.Session) -> None:
    run = session.config.stash[_RUN]
    run.whole_tree = _collects_whole_tree(session.config)
    bindings = {nodeid: test.falsifies for nodeid, test in run.tests.items()}
    run.problems[:0] = run.contracts.errors
    run.problems += check_bindings(run.contracts, bindings, complete=run.whole_tree)
    if run.problems:
        raise pytest.UsageError(
            "contract check failed:\n" + "\n".join(f"  - {p}" for p in run.problems)
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fold each phase (xfail already applied) into the test's outcome; note its models.

    A model is any fixture value carrying a ``ModelInfo`` (a backend or a wrapper around one),
    so a test needs no extra line to say which model file its evidence comes from.
    """
    report = yield
    run = item.config.stash[_RUN]
    test = run.tests.get(item.nodeid)
    if test is None:
        return report
    test.record_phase(report)
    funcargs: dict[str, object] = getattr(item, "funcargs", {})
    for value in funcargs.values():
        info = getattr(value, "info", None)
        if isinstance(info, ModelInfo):
            run.models.setdefault(info.path, info)
            test.model_paths.add(info.path)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash[_RUN]
    if run.findings_path is None:
        return
    root = session.config.rootpath
    facts = RunFacts(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        exit_status=int(exitstatus),
        args=list(session.config.invocation_params.args),
        whole_tree=run.whole_tree,
        duration_s=time.monotonic() - run.started,
        problems=run.problems,
        real_model_path=os.environ.get(REAL_MODEL_ENV) or None,
        host=host_facts(root),
        engine=engine_facts(),
        models={path: model_facts(info) for path, info in sorted(run.models.items())},
    )
    run.findings = build_findings(run.contracts, list(run.tests.values()), facts, root)
    run.findings_path.parent.mkdir(parents=True, exist_ok=True)
    partial = run.findings_path.with_name(run.findings_path.name + ".partial")
    partial.write_text(json.dumps(run.findings, indent=2) + "\n", encoding="utf-8")
    partial.replace(run.findings_path)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    run = config.stash[_RUN]
    if run.findings is None:
        return
    colour = {"PASS": "green", "FAIL": "red", "SKIPPED": "yellow", "NOT_RUN": "yellow"}
    terminalreporter.section(f"contracts: {run.findings_path}")
    for text, verdict in summary_lines(run.findings):
        markup = {colour[verdict]: True} if verdict else {}
        terminalreporter.line(text, **markup)


def _bound_test(request: pytest.FixtureRequest) -> tuple[ContractRun, BoundTest]:
    run = request.config.stash[_RUN]
    test = run.tests.get(request.node.nodeid)
    if test is None:
        pytest.fail(f"{request.node.nodeid} uses a contract fixture but falsifies nothing")
    return run, test


@pytest.fixture
def contract_threshold(request: pytest.FixtureRequest) -> ContractThreshold:
    """``contract_threshold(falsifier_id, key)``: a threshold read from the contract YAML.

    Only a falsifier the test is bound to may be read: a limit borrowed from another claim
    would file this test's evidence under the wrong verdict.
    """
    run, test = _bound_test(request)
    falsifiers = run.contracts.falsifiers()

    def read(falsifier_id: str, key: str) -> float:
        if falsifier_id not in test.falsifies:
            pytest.fail(
                f"{test.nodeid} reads a threshold of {falsifier_id} but does not falsify it"
            )
        thresholds = falsifiers[falsifier_id][1].thresholds
        if key not in thresholds:
            pytest.fail(f"{falsifier_id} has no threshold {key!r} (it has {sorted(thresholds)})")
        value = float(thresholds[key])
        test.thresholds_read[f"{falsifier_id}.{key}"] = value
        return value

    return read


@pytest.fixture
def record_finding(request: pytest.FixtureRequest) -> RecordFinding:
    """``record_finding(name, value)``: a measurement filed in findings.json under this test."""
    _, test = _bound_test(request)

    def record(name: str, value: Measurement) -> None:
        if name in test.measurements:
            pytest.fail(f"{test.nodeid} recorded {name!r} twice")
        test.measurements[name] = value

    return record
