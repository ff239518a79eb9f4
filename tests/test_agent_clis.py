"""The real agents, unmodified, against a real server process started with no flag for them:
Codex CLI over the Responses API, Claude Code over the Anthropic Messages API, Qwen Code and
opencode over Chat Completions (tools, streaming).

Each CLI is installed from the npm registry into ``.cache/agent-clis`` the first time (pinned
versions; ~50 s and ~1.6 GB) and configured only as its documentation says a custom endpoint
is configured (docs/agents.md): a model provider with ``wire_api = "responses"`` for Codex
(nothing about its tools: its default request offers a hosted ``web_search`` tool, which the
server leaves out), ``ANTHROPIC_BASE_URL`` for Claude Code, ``OPENAI_BASE_URL`` for Qwen Code,
an openai-compatible provider in ``opencode.json`` for opencode; their own traffic to their
vendors switched off. Each sends its full default prompt and tools: 34 K (Codex), 68 K
(Claude Code), ~70 K (Qwen Code) and 30 K (opencode) tokens on the demo model's small
vocabulary, prefilled in under a minute each here.

Two turns are checked per agent: a plain answer (the demo model's script, a thinking block
first), printed by the CLI, exit status 0; and a tool round trip on a Qwen3-Coder demo model
that calls the agent's shell tool while the conversation holds no tool result and answers
once it does (``app.demo``'s ``after_tool_script``): the agent runs the command (its
side effect is checked on disk), sends the result back, prints the answer and exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.demo import DEFAULT_SCRIPT, ensure_demo_model, script_text
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI_CACHE = ROOT / ".cache" / "agent-clis"
PACKAGES = {
    "codex": "@openai/codex@0.171.0",
    "claude": "@anthropic-ai/claude-code@2.1.197",
    "qwen": "@qwen-code/qwen-code@0.24.4",
    "opencode": "opencode-ai@1.18.33",
}
MODEL_ID = "qwen3-moe-demo"
MARKER = "agent-ran-the-tool"
ANSWER = b"".join(DEFAULT_SCRIPT[DEFAULT_SCRIPT.index(b"</think>") + 2 : -1]).decode()
AFTER_TOOL = (b"The", b" command", b" ran", b" and", b" wrote", b" its", b" marker", b".",
              b"<|im_end|>")  # fmt: skip
AFTER_TOOL_TEXT = script_text(AFTER_TOOL)


def _coder_call(function: str, parameter: str, command: str) -> tuple[bytes, ...]:
    """A Qwen3-Coder XML call, one unique piece per token (at most 32 bytes each)."""
    pieces = [
        b"<tool_call>",
        f"\n<function={function}>".encode(),
        f"\n<parameter={parameter}>".encode(),
    ]
    body = f"\n{command}".encode()
    pieces += [body[i : i + 24] for i in range(0, len(body), 24)]
    pieces += [b"\n</parameter>", b"\n</function>", b"\n</tool_call>", b"<|im_end|>"]
    return tuple(pieces)


def _run(command: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # PWD as a shell sets it: opencode takes its project folder (and its opencode.json) from
    # PWD, which subprocess leaves at the test runner's own folder.
    return subprocess.run(
        command,
        cwd=cwd,
        env={**env, "PWD": str(cwd)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def clis() -> dict[str, Path]:
    """The CLIs, installed once into the repository's cache (npm registry only)."""
    bins = {name: CLI_CACHE / "node_modules" / ".bin" / name for name in PACKAGES}
    if not all(path.exists() for path in bins.values()):
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install the agent CLIs under test"
        CLI_CACHE.mkdir(parents=True, exist_ok=True)
        done = _run(
            [npm, "install", "--prefix", str(CLI_CACHE), "--no-audit", "--no-fund",
             *PACKAGES.values()],
            cwd=CLI_CACHE,
            env=dict(os.environ),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
    for name, path in bins.items():
        version = _run([str(path), "--version"], cwd=CLI_CACHE, env=dict(os.environ))
        assert version.returncode == 0, f"{name} does not run here: {version.stderr[-2000:]}"
    return bins


def _server(
    tmp_path_factory: pytest.TempPathFactory, name: str, model: Path
) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp(name)
    # The agents' default prompts are 27 K (Codex) and 76 K (Claude Code) characters, about as
    # many tokens on the demo vocabulary; Claude Code asks for 32,000 tokens of answer.
    args = (
        "--n-ctx",
        "131072",
        "--n-threads",
        "2",
        "--log-level",
        "info",
        "--model-alias",
        MODEL_ID,
    )
    with ServerProcess(model, *args, cache_dir=cache) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _server(tmp_path_factory, "plain", ensure_demo_model(model_cache))


def _tool_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory, agent: str, tool: str, arg: str
) -> Iterator[ServerProcess]:
    """A Qwen3-Coder demo model that calls ``agent``'s own shell tool ``tool`` (its command
    in ``arg``) to write the marker file, and answers once the result is back."""
    call = _coder_call(tool, arg, f"echo {MARKER} > marker.txt")
    model = ensure_demo_model(
        model_cache, call, template="qwen3_coder", after_tool_script=AFTER_TOOL
    )
    yield from _server(tmp_path_factory, f"{agent}-tool", model)


@pytest.fixture(scope="module")
def codex_tool_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _tool_server(model_cache, tmp_path_factory, "codex", "exec_command", "cmd")


@pytest.fixture(scope="module")
def claude_tool_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _tool_server(model_cache, tmp_path_factory, "claude", "Bash", "command")


@pytest.fixture(scope="module")
def qwen_tool_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _tool_server(model_cache, tmp_path_factory, "qwen", "run_shell_command", "command")


@pytest.fixture(scope="module")
def opencode_tool_server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from _tool_server(model_cache, tmp_path_factory, "opencode", "bash", "command")


def _codex(
    clis: dict[str, Path], server: ServerProcess, work: Path, prompt: str
) -> subprocess.CompletedProcess[str]:
    home = work / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f"""model = "{MODEL_ID}"
model_provider = "local"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
plugins = false

[model_providers.local]
name = "qwen3-moe-serve"
base_url = "{server.url}/v1"
env_key = "LOCAL_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
""",
        encoding="utf-8",
    )
    env = {**os.environ, "CODEX_HOME": str(home), "LOCAL_API_KEY": "unused"}
    command = [str(clis["codex"]), "exec", "--skip-git-repo-check", "--ephemeral", prompt]
    return _run(command, cwd=work, env=env)


def _claude(
    clis: dict[str, Path], server: ServerProcess, work: Path, prompt: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_API_KEY": "unused",
        "ANTHROPIC_MODEL": MODEL_ID,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL_ID,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CONFIG_DIR": str(work / "claude-home"),
    }
    command = [str(clis["claude"]), "-p", prompt, "--allowedTools", "Bash",
               "--no-session-persistence"]  # fmt: skip
    return _run(command, cwd=work, env=env)


def _qwen(
    clis: dict[str, Path], server: ServerProcess, work: Path, prompt: str
) -> subprocess.CompletedProcess[str]:
    home = work / "qwen-home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "OPENAI_BASE_URL": f"{server.url}/v1",
        "OPENAI_API_KEY": "unused",
        "OPENAI_MODEL": MODEL_ID,
        "QWEN_CODE_SUPPRESS_YOLO_WARNING": "1",
    }
    command = [str(clis["qwen"]), "-p", prompt, "--yolo"]
    return _run(command, cwd=work, env=env)


def _opencode(
    clis: dict[str, Path], server: ServerProcess, work: Path, prompt: str
) -> subprocess.CompletedProcess[str]:
    config = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "qwen3-moe-serve",
                "options": {"baseURL": f"{server.url}/v1", "apiKey": "unused"},
                "models": {MODEL_ID: {"name": MODEL_ID}},
            }
        },
        "model": f"local/{MODEL_ID}",
        "autoupdate": False,
        "share": "disabled",
    }
    (work / "opencode.json").write_text(json.dumps(config), encoding="utf-8")
    home = work / "opencode-home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_STATE_HOME": str(home / "state"),
    }
    return _run([str(clis["opencode"]), "run", prompt], cwd=work, env=env)


def _served(server: ServerProcess, path: str) -> list[dict[str, object]]:
    """The access-log lines of the server for ``path`` (JSON lines, info level)."""
    lines = []
    for line in server.log(tail=None).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("logger") == "app.access" and str(record.get("path", "")).startswith(path):
            lines.append(record)
    return lines


Run = Callable[[dict[str, Path], ServerProcess, Path, str], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Agent:
    run: Run
    path: str
    """The route it speaks."""
    default_prompt: int
    """Fewer prompt tokens than its default prompt and tools come to on the demo vocabulary
    (34 K Codex, 68 K Claude Code, 67 K Qwen Code, 27 K opencode): it sent them all."""


AGENTS = {
    "codex": Agent(_codex, "/v1/responses", 30_000),
    "claude": Agent(_claude, "/v1/messages", 60_000),
    "qwen": Agent(_qwen, "/v1/chat/completions", 60_000),
    "opencode": Agent(_opencode, "/v1/chat/completions", 20_000),
}


@pytest.mark.parametrize("name", AGENTS)
def test_an_agent_with_its_defaults_completes_a_turn(
    clis: dict[str, Path], plain_server: ServerProcess, tmp_path: Path, name: str
) -> None:
    """Its default request, every tool it offers by default (hosted ones left out): served,
    the answer printed, exit 0."""
    agent = AGENTS[name]
    before = len(_served(plain_server, agent.path))
    done = agent.run(clis, plain_server, tmp_path, "say hi")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert ANSWER in done.stdout
    turns = [t for t in _served(plain_server, agent.path)[before:] if t.get("finish_reason")]
    assert turns and all(t["status"] == 200 for t in turns)
    assert max(int(str(t["prompt_tokens"])) for t in turns) > agent.default_prompt


@pytest.mark.parametrize("name", AGENTS)
def test_an_agent_runs_its_own_tool_and_sends_the_result_back(
    clis: dict[str, Path], request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    """The model calls the agent's shell tool: the agent runs it (the file is on disk), sends
    the result back, and prints the model's answer to it."""
    agent = AGENTS[name]
    server: ServerProcess = request.getfixturevalue(f"{name}_tool_server")
    done = agent.run(clis, server, tmp_path, "write the marker file")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "marker.txt").read_text().strip() == MARKER
    assert AFTER_TOOL_TEXT in done.stdout
    turns = [t["finish_reason"] for t in _served(server, agent.path) if t.get("finish_reason")]
    # opencode first asks for a title (no tools, the script's answer): the rest is the agent's
    assert turns[-2:] == ["tool_calls", "stop"] and set(turns[:-2]) <= {"stop"}, turns
    assert len(turns) == (3 if name == "opencode" else 2), turns
