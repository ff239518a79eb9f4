"""Replicas behind the shipped nginx configuration: a conversation stays on one replica.

Real server processes (``tests.support.servers``) behind a real nginx running
``deploy/nginx/nginx.conf`` as ``bench.nginx.render`` leaves it: the shipped file with the
replicas' loopback addresses in its upstream, a free loopback port to listen on, and Docker's
resolver taken out. Which replica served a request is read from the replicas' own access logs
(each request carries its own ``x-request-id``, which the server logs).

Each conversation sends what its agent sends (the headers captured from the agents
themselves, docs/deployment.md): Claude Code's ``X-Claude-Code-Session-Id``, Codex's
``session-id`` (and ``session_id`` of older builds), opencode's ``x-session-affinity`` and
``x-session-id``, and nothing at all beyond a credential, as Qwen Code does. Skipped, with the
reason, where no nginx binary is found; ``.ci/run`` installs one.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.nginx import Nginx, find_nginx, free_port, render
from tests.support.servers import ServerProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

MODEL_ID = "qwen3-moe-demo"
REPLICAS = 3
TURNS = 3
# The slow random model (never ends a generation): a long request lasts as long as asked.
REPLICA_ARGS = (
    "--model-alias", MODEL_ID, "--n-ctx", "4096", "--parallel", "2", "--cache-ram", "64",
    "--n-threads", "1", "--log-level", "info", "--shutdown-grace-s", "60",
)  # fmt: skip

CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "session_id", "x-session-affinity")
"""The headers each test conversation names itself by, in the order nginx.conf prefers them."""


@dataclass(frozen=True)
class Conversation:
    name: str
    path: str
    headers: Mapping[str, str]

    def body(self, turn: int, max_tokens: int = 4) -> dict[str, Any]:
        """Turn ``turn`` (from 1): the whole conversation so far, as an agent resends it."""
        messages: list[dict[str, str]] = []
        for earlier in range(1, turn + 1):
            messages.append({"role": "user", "content": f"{self.name}, turn {earlier}"})
            if earlier < turn:
                messages.append({"role": "assistant", "content": "ok"})
        if self.path == RESPONSES:
            return {"model": MODEL_ID, "input": messages, "max_output_tokens": max_tokens}
        return {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens}


def session() -> str:
    return str(uuid.uuid4())


def claude_code(name: str) -> Conversation:
    """Claude Code 2.1.197: the header, and ``x-api-key`` for its credential."""
    headers = {"X-Claude-Code-Session-Id": session(), "x-api-key": "sk-claude"}
    return Conversation(name, MESSAGES, {**headers, "anthropic-version": "2023-06-01"})


def codex(name: str, header: str = "session-id") -> Conversation:
    """Codex 0.171.0 sends ``session-id`` (and ``thread-id``, the same id for a main thread)."""
    sid = session()
    return Conversation(
        name, RESPONSES, {header: sid, "thread-id": sid, "authorization": "Bearer sk-codex"}
    )


def opencode(name: str) -> Conversation:
    """opencode 1.18.33 with a custom provider: both headers, one ``ses_…`` value."""
    sid = f"ses_{uuid.uuid4().hex[:26]}"
    return Conversation(
        name,
        CHAT,
        {"x-session-affinity": sid, "x-session-id": sid, "authorization": "Bearer sk-opencode"},
    )


def keyless(name: str, credential: str) -> Conversation:
    """Qwen Code 0.24.4 against a custom endpoint: no conversation header, only its key."""
    return Conversation(name, CHAT, {"authorization": f"Bearer {credential}"})


# -- the processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_binary() -> Path:
    binary = find_nginx()
    if binary is None:
        pytest.skip("no nginx binary ($NGINX, PATH, /usr/sbin/nginx): apt-get install nginx")
    return binary


@contextlib.contextmanager
def replicas_behind_nginx(
    binary: Path, model: Path, folder: Path
) -> Iterator[tuple[list[ServerProcess], Nginx]]:
    """``REPLICAS`` servers, started side by side, behind nginx with the shipped file."""
    folder.mkdir(parents=True, exist_ok=True)
    servers = [ServerProcess(model, *REPLICA_ARGS, cache_dir=folder) for _ in range(REPLICAS)]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.push(server.__exit__)
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda server: server.__enter__(), servers))
        port = free_port()
        config = render([f"127.0.0.1:{s.port}" for s in servers], port, folder / "nginx")
        balancer = stack.enter_context(Nginx(binary, config, folder / "nginx", port))
        yield servers, balancer


@pytest.fixture(scope="module")
def cluster(
    nginx_binary: Path, slow_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[ServerProcess], Nginx]]:
    folder = tmp_path_factory.mktemp("replicas")
    with replicas_behind_nginx(nginx_binary, slow_model_path, folder) as running:
        yield running


# -- who served what --------------------------------------------------------------------------


def access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log(tail=None).splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("logger") == "app.access":
                lines.append(record)
    return lines


def answered(servers: Sequence[ServerProcess], request_id: str) -> dict[int, list[int]]:
    """The statuses each replica (by index) logged for ``request_id``."""
    found: dict[int, list[int]] = {}
    for index, server in enumerate(servers):
        for record in access_lines(server):
            if record.get("request_id") == request_id:
                found.setdefault(index, []).append(int(record["status"]))
    return found


def served_by(servers: Sequence[ServerProcess], request_id: str) -> int:
    """The replica that answered ``request_id`` with 200 (its log line comes after the body)."""
    wait_until(lambda: any(200 in s for s in answered(servers, request_id).values()), timeout=15)
    (index,) = [i for i, s in answered(servers, request_id).items() if 200 in s]
    return index


def nginx_conversations(balancer: Nginx) -> dict[str, str]:
    """The conversation nginx placed each request by (its access log), by request id."""
    found = {}
    for line in balancer.log().splitlines():
        match = re.search(r'conversation="([^"]*)" request_id=(\S+)', line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def send_turn(http: httpx.Client, conversation: Conversation, turn: int, request_id: str) -> None:
    response = http.post(
        conversation.path,
        json=conversation.body(turn),
        headers={**conversation.headers, "x-request-id": request_id},
    )
    assert response.status_code == 200, (conversation.name, turn, response.text)
    assert response.headers["x-request-id"] == request_id


def play(
    http: httpx.Client,
    servers: Sequence[ServerProcess],
    conversations: Sequence[Conversation],
    turns: Sequence[int],
    sent_ids: dict[str, Conversation] | None = None,
) -> dict[str, list[int]]:
    """The given turns of every conversation, interleaved as concurrent agents' would be; the
    replica that served each turn, by conversation (and in ``sent_ids``, each request id's
    conversation)."""
    sent_ids = {} if sent_ids is None else sent_ids
    placed: dict[str, list[int]] = {c.name: [] for c in conversations}
    for turn in turns:
        for conversation in conversations:
            request_id = f"{conversation.name}-{turn}-{uuid.uuid4().hex[:8]}"
            send_turn(http, conversation, turn, request_id)
            placed[conversation.name].append(served_by(servers, request_id))
            sent_ids[request_id] = conversation
    return placed


# -- the tests --------------------------------------------------------------------------------


def test_every_turn_of_a_conversation_lands_on_the_replica_of_its_first(
    cluster: tuple[list[ServerProcess], Nginx],
) -> None:
    """Each agent's own header keeps its conversation on one replica; a client that sends
    none keeps all its conversations on one; and conversations spread over the replicas."""
    servers, balancer = cluster
    conversations = [
        claude_code("claude-a"),
        claude_code("claude-b"),
        codex("codex-a"),
        codex("codex-b"),
        codex("codex-old", header="session_id"),  # needs underscores_in_headers
        opencode("opencode-a"),
        opencode("opencode-b"),
        keyless("qwen-x1", "sk-client-x"),
        keyless("qwen-x2", "sk-client-x"),
        keyless("qwen-y1", "sk-client-y"),
        keyless("qwen-y2", "sk-client-y"),
    ]
    sent: dict[str, Conversation] = {}
    with httpx.Client(base_url=balancer.url, timeout=60) as http:
        placed = play(http, servers, conversations, range(1, TURNS + 1), sent)
    # nginx placed each request by the conversation its agent's header names, or by none.
    wait_until(lambda: set(sent) <= set(nginx_conversations(balancer)))
    logged = nginx_conversations(balancer)
    for request_id, conversation in sent.items():
        headers = {k.lower(): v for k, v in conversation.headers.items()}
        named = next((headers[h] for h in SESSION_HEADERS if h in headers), "")
        assert logged[request_id] == named, (conversation, logged[request_id])
    for name, replicas in placed.items():
        assert len(set(replicas)) == 1, (name, placed, balancer.log()[-3000:])
    # A client without a conversation header is one key: its conversations share a replica.
    assert placed["qwen-x1"][0] == placed["qwen-x2"][0], placed
    assert placed["qwen-y1"][0] == placed["qwen-y2"][0], placed
    # Eleven keys on three replicas all land on one with probability below 1e-4 for an even
    # ring (each replica owns 160 points of it): more than one replica means a spread.
    assert len({replicas[0] for replicas in placed.values()}) > 1, placed


def test_a_stream_through_nginx_arrives_event_by_event(
    cluster: tuple[list[ServerProcess], Nginx],
) -> None:
    """Tokens reach an agent as they are decoded, uncompressed, not as one blob at the end.

    Two things keep nginx from holding a stream back, each enough on its own with nginx 1.22:
    the server's ``X-Accel-Buffering: no`` and the file's ``proxy_buffering off`` (with
    either alone, or both, nginx passed 190 of 200 events on in reads of their own here). So
    this checks the outcome an agent sees, with the ``Accept-Encoding`` agents send.
    """
    _, balancer = cluster
    conversation = opencode("stream")
    body = {**conversation.body(1, max_tokens=32), "stream": True}
    headers = {**conversation.headers, "accept-encoding": "gzip, deflate, br, zstd"}
    reads: list[bytes] = []
    with (
        httpx.Client(base_url=balancer.url, timeout=60) as http,
        http.stream("POST", CHAT, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        reads.extend(piece for piece in response.iter_raw() if piece)
    text = b"".join(reads).decode()
    payloads = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    tokens = sum(
        1
        for p in payloads[:-1]
        for choice in json.loads(p)["choices"]
        if choice["delta"].get("content")
    )
    assert tokens >= 24, payloads
    carrying = [piece for piece in reads if b"data: " in piece]
    # Each token is decoded ~1 ms after the last; a client reading as events come sees most of
    # them apart. A third leaves room for a loaded machine; a buffered stream has one or two.
    assert len(carrying) >= tokens // 3, [len(piece) for piece in reads]


def test_a_draining_replica_hands_on_its_conversations_and_no_other_moves(
    nginx_binary: Path, slow_model_path: Path, tmp_path: Path
) -> None:
    """A replica told to stop (SIGTERM) answers 503 while its running request finishes:
    nginx hands each of its conversations to the next replica on the ring, the same one turn
    after turn, and every other conversation stays where it was."""
    conversations = [opencode(f"conversation-{n}") for n in range(9)]
    with (
        replicas_behind_nginx(nginx_binary, slow_model_path, tmp_path) as (servers, balancer),
        httpx.Client(base_url=balancer.url, timeout=60) as http,
    ):
        before = {n: r[0] for n, r in play(http, servers, conversations, [1]).items()}
        counts = [list(before.values()).count(i) for i in range(REPLICAS)]
        victim = counts.index(max(counts))
        drained = {n for n, r in before.items() if r == victim}
        # A long request keeps the victim draining (not gone) while the next turns arrive.
        with httpx.Client(base_url=servers[victim].url, timeout=60) as direct:
            long = {**conversations[0].body(1, max_tokens=4000), "stream": True}
            with direct.stream("POST", CHAT, json=long) as running:
                assert running.status_code == 200
                pieces = running.iter_raw()  # kept: a dropped iterator closes the stream
                next(pieces)
                stopping = servers[victim].process
                assert stopping is not None
                stopping.send_signal(signal.SIGTERM)
                wait_until(lambda: direct.get("/health").status_code == 503, timeout=15)
                moved_ids: dict[str, str] = {}
                after: dict[str, int] = {}
                for conversation in conversations:
                    request_id = f"{conversation.name}-2-{uuid.uuid4().hex[:8]}"
                    send_turn(http, conversation, 2, request_id)
                    after[conversation.name] = served_by(servers, request_id)
                    moved_ids[conversation.name] = request_id
                still_draining = direct.get("/health").status_code == 503
                third = {n: r[0] for n, r in play(http, servers, conversations, [3]).items()}
        assert still_draining, "the long request ended before the turns were sent"
        for name in before:
            if name in drained:
                assert after[name] != victim, (name, before, after)
                assert third[name] == after[name], (name, after, third)
            else:
                assert after[name] == before[name] == third[name], (name, before, after, third)
        # The drain was what moved them: the victim itself answered 503 to at least the first
        # of its conversations' turns (nginx stops trying it after three failures).
        turned_away = [n for n in drained if 503 in answered(servers, moved_ids[n]).get(victim, [])]
        assert turned_away, (drained, servers[victim].log())
        wait_until(lambda: not servers[victim].alive, timeout=30)
        # Gone, not draining: the same conversations stay where the drain sent them.
        fourth = {n: r[0] for n, r in play(http, servers, conversations, [4]).items()}
        assert fourth == third, (third, fourth)


def test_the_replicas_bench_measures_every_setup(nginx_binary: Path, tmp_path: Path) -> None:
    """``python -m bench.replicas --quick``: the harness end to end (its figures are checked
    in the committed run, tests/test_deploy.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.replicas", "--quick", "--out", str(tmp_path),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "replicas.json").read_text())
    setups = {row["label"]: row for row in results["setups"]}
    assert len(setups) == 3 and all(row["status"] == "ok" for row in setups.values()), setups
    assert all(row["errors"] == 0 for row in setups.values())
    hashed = setups["consistent hash (nginx.conf)"]
    assert hashed["replica_changes"] == 0 and hashed["cached_share"] >= 0.85, hashed
    assert (tmp_path / "replicas.md").read_text().startswith("# Conversations on replicas")
