"""The contract checker itself, on throwaway projects run in-process by ``pytester``.

Each test writes a small project (a contract, the module it governs, some bound tests), runs
pytest on it with this repository's plugin, and reads the exit status, the error output and
the findings file the run left behind. What must hold: a malformed contract, a marker naming
an unknown falsifier, or an unbound falsifier stops the run before any test; and the verdicts
in findings.json follow the outcomes, a skip never counting as a pass.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.contract_schema import load_contracts

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_ID = "DEMO_CLAIMS_V1"
CONTRACT_FILE = "demo-claims-v1.yaml"


def contract_yaml(n_falsifiers: int = 2) -> str:
    falsifiers = "".join(
        f"""\
  - id: {CONTRACT_ID}_{i:03d}
    claim: Claim number {i} holds.
    falsified_if: A test bound to claim {i} fails.
"""
        for i in range(2, n_falsifiers + 1)
    )
    return f"""\
id: {CONTRACT_ID}
version: 1.2.0
description: Claims about a throwaway module.
scope: [governed.py]
equations:
  identity: "x == x"
falsifiers:
  - id: {CONTRACT_ID}_001
    claim: Claim number 1 holds.
    falsified_if: A test bound to claim 1 fails.
    thresholds:
      limit_ms: 250
    rationale: A number for the tests to read.
{falsifiers}"""


@dataclass
class Run:
    result: pytest.RunResult
    findings: dict[str, Any] | None

    @property
    def errors(self) -> str:
        return self.result.stderr.str()

    def falsifier(self, falsifier_id: str) -> dict[str, Any]:
        assert self.findings is not None
        entries = [f for c in self.findings["contracts"] for f in c["falsifiers"]]
        (found,) = [f for f in entries if f["id"] == falsifier_id]
        falsifier: dict[str, Any] = found
        return falsifier

    def verdicts(self) -> dict[str, str]:
        assert self.findings is not None
        return {f["id"]: f["verdict"] for c in self.findings["contracts"] for f in c["falsifiers"]}


@pytest.fixture
def project(pytester: pytest.Pytester) -> Callable[..., Run]:
    """``project(tests, contract=..., *args)``: write a project, run pytest on it."""
    pytester.makeconftest('pytest_plugins = ["tests.contracts_plugin"]')
    (pytester.path / "governed.py").write_text("")
    (pytester.path / "contracts").mkdir()

    def run(
        tests: str,
        *args: str,
        contract: str | None = None,
        contract_file: str = CONTRACT_FILE,
    ) -> Run:
        (pytester.path / "contracts" / contract_file).write_text(contract or contract_yaml())
        pytester.makepyfile(test_claims=textwrap.dedent(tests))
        findings = pytester.path / "out" / "findings.json"
        result = pytester.runpytest(f"--findings={findings}", *args)
        data = json.loads(findings.read_text()) if findings.exists() else None
        return Run(result, data)

    return run


BOTH_BOUND = """
    import pytest

    @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
    def test_one():
        pass

    @pytest.mark.falsifies("DEMO_CLAIMS_V1_002")
    def test_two():
        pass
"""


def test_verdicts_follow_outcomes_and_a_skip_is_never_a_pass(project: Callable[..., Run]) -> None:
    run = project(
        """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("setup broke")

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
        @pytest.mark.parametrize("n", [1, 2])
        def test_passes(n, contract_threshold, record_finding):
            record_finding("limit_seen", contract_threshold("DEMO_CLAIMS_V1_001", "limit_ms"))
            record_finding("n", n)

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_001", "DEMO_CLAIMS_V1_002")
        def test_passes_for_two_claims():
            pass

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_002")
        def test_fails():
            assert 1 + 1 == 3

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_003")
        def test_passes_beside_a_skip():
            pass

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_003")
        def test_skips():
            pytest.skip("no real model here")

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_004")
        def test_deselected():
            pass

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_005")
        @pytest.mark.xfail(reason="known bug")
        def test_known_bug():
            assert False

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_006")
        def test_setup_breaks(broken):
            pass
        """,
        "-k",
        "not deselected",
        contract=contract_yaml(6),
    )
    run.result.assert_outcomes(passed=4, failed=1, skipped=1, xfailed=1, errors=1, deselected=1)
    assert run.result.ret == pytest.ExitCode.TESTS_FAILED
    assert run.verdicts() == {
        "DEMO_CLAIMS_V1_001": "PASS",
        "DEMO_CLAIMS_V1_002": "FAIL",
        "DEMO_CLAIMS_V1_003": "SKIPPED",
        "DEMO_CLAIMS_V1_004": "NOT_RUN",
        "DEMO_CLAIMS_V1_005": "FAIL",
        "DEMO_CLAIMS_V1_006": "FAIL",
    }
    assert run.findings is not None
    assert run.findings["contracts"][0]["verdict"] == "FAIL"
    assert run.findings["summary"] == {"FAIL": 3, "SKIPPED": 1, "NOT_RUN": 1, "PASS": 1}
    assert run.findings["run"]["collection"] == "whole tree"  # -k deselects, it does not narrow
    assert run.findings["run"]["exit_status"] == 1

    outcomes = {
        t["nodeid"].rpartition("::")[2]: t
        for f in run.verdicts()
        for t in run.falsifier(f)["tests"]
    }
    assert {name: t["outcome"] for name, t in outcomes.items()} == {
        "test_passes[1]": "passed",
        "test_passes[2]": "passed",
        "test_passes_for_two_claims": "passed",
        "test_fails": "failed",
        "test_passes_beside_a_skip": "passed",
        "test_skips": "skipped",
        "test_deselected": "not_run",
        "test_known_bug": "xfailed",
        "test_setup_breaks": "error",
    }
    assert outcomes["test_skips"]["skip_reason"] == "no real model here"
    assert outcomes["test_deselected"]["deselected"] is True
    assert outcomes["test_passes[2]"]["measurements"] == {"limit_seen": 250.0, "n": 2}
    assert outcomes["test_passes[2]"]["thresholds_read"] == {"DEMO_CLAIMS_V1_001.limit_ms": 250.0}
    assert run.falsifier("DEMO_CLAIMS_V1_001")["thresholds"] == {"limit_ms": 250}

    run.result.stdout.fnmatch_lines(
        [
            "*contracts: *findings.json*",
            "FAIL     DEMO_CLAIMS_V1 1.2.0 (3 FAIL, 1 SKIPPED, 1 NOT_RUN, 1 PASS)",
            "*FAIL     DEMO_CLAIMS_V1_002: refuted by test_fails",
            "*SKIPPED  DEMO_CLAIMS_V1_003: 1 of 2 bound tests skipped: no real model here",
            "*NOT_RUN  DEMO_CLAIMS_V1_004: 1 of 1 bound tests not run (deselected or interrupted)",
        ]
    )


def test_a_passing_run_records_what_it_ran_on(
    project: Callable[..., Run], pytester: pytest.Pytester
) -> None:
    weights = pytester.path / "tiny.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 3)
    run = project(
        f"""
        import pytest
        from types import SimpleNamespace
        from app.engine import ModelInfo

        @pytest.fixture
        def backend():
            info = ModelInfo(
                path={str(weights)!r}, n_ctx=64, n_vocab=8, architecture="qwen3moe",
                chat_template=None, bos_token="", eos_token="", gpu_offload=False,
            )
            return SimpleNamespace(info=info)

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
        def test_on_the_model(backend):
            pass

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_002")
        def test_without_a_model():
            pass
        """
    )
    assert run.result.ret == pytest.ExitCode.OK
    assert run.verdicts() == {"DEMO_CLAIMS_V1_001": "PASS", "DEMO_CLAIMS_V1_002": "PASS"}
    assert run.findings is not None
    model = run.findings["models"]["tiny.gguf"]
    assert model["architecture"] == "qwen3moe"
    assert model["size_bytes"] == weights.stat().st_size
    assert model["sha256_prefix"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert model["sha256_method"] == "sha256 of the whole file"
    assert run.falsifier("DEMO_CLAIMS_V1_001")["models"] == ["tiny.gguf"]
    assert run.falsifier("DEMO_CLAIMS_V1_002")["models"] == []
    env = run.findings["environment"]
    assert env["llama_cpp_python"] == importlib.metadata.version("llama_cpp_python")
    assert env["cuda_used"] is False and env["gpu_offload_used"] is False
    assert env["hostname"] and "git_commit" in env
    assert run.findings["contracts"][0]["file"] == f"contracts/{CONTRACT_FILE}"


def test_findings_path_comes_from_the_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest('pytest_plugins = ["tests.contracts_plugin"]')
    (pytester.path / "governed.py").write_text("")
    (pytester.path / "contracts").mkdir()
    (pytester.path / "contracts" / CONTRACT_FILE).write_text(contract_yaml())
    pytester.makepyfile(test_claims=textwrap.dedent(BOTH_BOUND))
    target = pytester.path / "elsewhere" / "record.json"
    monkeypatch.setenv("QWEN3_MOE_FINDINGS", str(target))
    assert pytester.runpytest().ret == pytest.ExitCode.OK
    assert json.loads(target.read_text())["summary"]["PASS"] == 2
    assert not (pytester.path / "findings.json").exists()


def _replace(old: str, new: str) -> str:
    text = contract_yaml()
    assert old in text
    return text.replace(old, new, 1)


MALFORMED = [
    ("misspelt top-level key", _replace("falsifiers:", "falsifers:"), "falsifers: Extra inputs"),
    (
        "misspelt falsifier key",
        _replace("    rationale:", "    threshold: {x: 1}\n    rationale:"),
        "falsifiers.0.threshold: Extra inputs",
    ),
    ("version not semver", _replace("1.2.0", "v1.2.0"), "version: String should match pattern"),
    ("major version and id disagree", _replace("1.2.0", "2.0.0"), "but version is 2.0.0"),
    ("falsifier of another contract", _replace("V1_002", "V2_002"), "must be DEMO_CLAIMS_V1_NNN"),
    ("falsifier id twice", _replace("V1_002", "V1_001"), "DEMO_CLAIMS_V1_001 appears twice"),
    (
        "threshold without rationale",
        _replace("    rationale: A number for the tests to read.\n", ""),
        "thresholds need a rationale",
    ),
    ("threshold not a number", _replace("250", "fast"), "thresholds.limit_ms"),
    ("scope names a missing module", _replace("governed.py", "gone.py"), "do not exist: gone.py"),
    ("no falsifiers", contract_yaml().split("falsifiers:")[0] + "falsifiers: []\n", "at least 1"),
    ("not YAML", "id: [unclosed\n", "not valid YAML"),
    ("not a mapping", "- just\n- a list\n", "a contract is a YAML mapping"),
]


@pytest.mark.parametrize(
    ("contract", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_contract_stops_the_run(
    project: Callable[..., Run], contract: str, message: str
) -> None:
    run = project(BOTH_BOUND, contract=contract)
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert "contract check failed" in run.errors
    assert message in run.errors
    run.result.assert_outcomes()  # nothing ran
    assert run.findings is not None
    assert any(message in p for p in run.findings["run"]["contract_problems"])


def test_a_contract_in_a_file_not_named_after_it_stops_the_run(
    project: Callable[..., Run],
) -> None:
    run = project(BOTH_BOUND, contract_file="claims.yaml")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"must be in a file named {CONTRACT_FILE}" in run.errors


ONLY_FIRST_BOUND = """
    import pytest

    @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
    def test_one():
        pass

    def test_unbound():
        pass
"""


@pytest.mark.parametrize("args", [(), (".",), ("-k", "test_one"), ("-m", "falsifies")])
def test_an_unbound_falsifier_stops_a_whole_tree_run(
    project: Callable[..., Run], args: tuple[str, ...]
) -> None:
    run = project(ONLY_FIRST_BOUND, *args)
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"DEMO_CLAIMS_V1_002 ({CONTRACT_FILE}) is bound to no test" in run.errors
    run.result.assert_outcomes()


def test_a_run_of_one_file_checks_only_the_markers_it_sees(project: Callable[..., Run]) -> None:
    run = project(ONLY_FIRST_BOUND, "test_claims.py")
    assert run.result.ret == pytest.ExitCode.OK
    assert run.findings is not None
    assert run.findings["run"]["collection"] == "partial"
    # test_one passed, but bound tests in files this run did not collect may exist.
    assert run.verdicts() == {"DEMO_CLAIMS_V1_001": "NOT_RUN", "DEMO_CLAIMS_V1_002": "NOT_RUN"}
    assert "only part of the test tree" in run.falsifier("DEMO_CLAIMS_V1_001")["reason"]

    forced = project(ONLY_FIRST_BOUND, "test_claims.py", "--contracts-complete")
    assert forced.result.ret == pytest.ExitCode.USAGE_ERROR
    assert "DEMO_CLAIMS_V1_002" in forced.errors


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('"DEMO_CLAIMS_V1_009"', "falsifies unknown id DEMO_CLAIMS_V1_009"),
        ('"DEMO_CLAIMS_V1_01"', "falsifies unknown id DEMO_CLAIMS_V1_01"),
        ("", "@falsifies takes falsifier ids and only them"),
        ("1", "@falsifies got 1, not an id"),
    ],
)
def test_a_bad_marker_stops_even_a_run_of_one_file(
    project: Callable[..., Run], marker: str, message: str
) -> None:
    tests = (
        BOTH_BOUND
        + f"""
    @pytest.mark.falsifies({marker})
    def test_bad_marker():
        pass
    """
    )
    run = project(tests, "test_claims.py")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in run.errors
    run.result.assert_outcomes()


def test_contract_fixtures_refuse_evidence_filed_under_the_wrong_claim(
    project: Callable[..., Run],
) -> None:
    run = project(
        """
        import pytest

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_002")
        def test_borrows_a_threshold(contract_threshold):
            contract_threshold("DEMO_CLAIMS_V1_001", "limit_ms")

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
        def test_reads_a_missing_threshold(contract_threshold):
            contract_threshold("DEMO_CLAIMS_V1_001", "limit_s")

        @pytest.mark.falsifies("DEMO_CLAIMS_V1_001")
        def test_records_twice(record_finding):
            record_finding("x", 1)
            record_finding("x", 2)

        def test_records_without_a_claim(record_finding):
            pass
        """
    )
    run.result.assert_outcomes(failed=3, errors=1)
    run.result.stdout.fnmatch_lines_random(
        [
            "*reads a threshold of DEMO_CLAIMS_V1_001 but does not falsify it*",
            "*DEMO_CLAIMS_V1_001 has no threshold 'limit_s' (it has *limit_ms*",
            "*recorded 'x' twice*",
            "*test_records_without_a_claim uses a contract fixture but falsifies nothing*",
        ]
    )
    assert run.verdicts() == {"DEMO_CLAIMS_V1_001": "FAIL", "DEMO_CLAIMS_V1_002": "FAIL"}


def test_the_repository_contracts_validate() -> None:
    """The real contracts load cleanly and carry the claims the streaming issue asks for."""
    contracts = load_contracts(ROOT / "contracts", ROOT)
    assert contracts.errors == ()
    falsifiers = contracts.falsifiers()
    streaming = [f"QWEN3_MOE_STREAMING_SSE_V2_{i:03d}" for i in range(1, 5)]
    assert set(streaming) <= set(falsifiers)
    latency = falsifiers["QWEN3_MOE_STREAMING_SSE_V2_003"][1].thresholds
    assert set(latency) == {"median_gap_ms_max", "gap_to_engine_ratio_max"}
