"""Deployment: the image, compose, nginx, Kubernetes, RPC scale-out and the GPU check script.

No Docker engine, cluster or GPU is at hand where the suite runs, so the files are checked
against the code they must agree with: every variable compose sets is a real setting, every
probe asks a real route, every port is the one the server listens on, and the files the
Dockerfile copies are in the build context. What can run without those does run, for real: the
image's entrypoint and healthcheck start and probe a real server with compose's environment,
the RPC worker serves a real model to a real server where the build has RPC, and the GPU check
script reports a machine without a GPU as one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from app.settings import ENV_PREFIX, Settings
from bench.replicas import markdown as replicas_report
from tests.support.servers import LiveServer, settings_for

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX = ROOT / "deploy" / "nginx" / "nginx.conf"
K8S = ROOT / "deploy" / "k8s"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
RPC_WORKER = ROOT / "deploy" / "rpc_worker.py"
SERVER_PORT = 8000
SERVER = Path(sys.executable).with_name("qwen3-moe-serve")
HELLO = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}


# -- compose ------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's ``${NAME}``, ``${NAME-default}`` and ``${NAME:-default}``, from ``env``."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _INTERPOLATION.sub(one, value)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def server_services() -> dict[str, dict[str, Any]]:
    """The services that run qwen3-moe-serve (not nginx, not the RPC worker)."""
    return {
        name: service
        for name, service in services().items()
        if str(service.get("image", "")).startswith("qwen3-moe-serve") and "command" not in service
    }


def environment(service: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A service's environment as the container gets it, compose defaults applied."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(key): interpolate(str(value), env) for key, value in raw.items()}


def test_compose_sets_only_real_settings() -> None:
    """A misspelt variable would be ignored by pydantic and silently take the default."""
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    text = COMPOSE.read_text(encoding="utf-8")
    referenced = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))
    assert referenced, "compose.yaml passes no settings"
    assert referenced <= fields, sorted(referenced - fields)
    for name, service in server_services().items():
        prefixed = {key for key in environment(service) if key.startswith(ENV_PREFIX)}
        assert prefixed <= fields, (name, sorted(prefixed - fields))


def test_compose_passes_every_setting_to_every_server() -> None:
    """So that any setting can be changed from the shell or .env without editing the file.

    A new setting needs its line in compose.yaml's x-settings block (empty: the default).
    """
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for name, service in server_services().items():
        missing = fields - set(environment(service))
        assert not missing, (name, sorted(missing))


def test_compose_fixes_what_the_container_needs() -> None:
    for name, service in server_services().items():
        env = environment(service, {"QWEN3_MOE_SERVE_HOST": "127.0.0.1"})
        assert env[f"{ENV_PREFIX}HOST"] == "0.0.0.0", name  # not overridable from the shell
        assert env[f"{ENV_PREFIX}PORT"] == str(SERVER_PORT), name
        assert env[f"{ENV_PREFIX}MODEL"].startswith("/models/"), name
        cache_dir = env[f"{ENV_PREFIX}CACHE_DIR"]
        assert any(volume["target"] == cache_dir for volume in service["volumes"]), name


def test_compose_models_are_mounted_read_only() -> None:
    for name, service in server_services().items():
        mounts = [volume for volume in service["volumes"] if volume["target"] == "/models"]
        assert len(mounts) == 1 and mounts[0]["read_only"] is True, name


def test_compose_reserves_an_nvidia_gpu_for_every_cuda_service() -> None:
    cuda = {name: s for name, s in services().items() if s.get("image", "").endswith(":cuda")}
    assert {"qwen3-moe-serve", "replica-0", "replica-1", "rpc-worker"} <= set(cuda)
    for name, service in cuda.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    # Replicas on one machine each get their own GPU.
    pinned = [
        services()[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("replica-0", "replica-1")
    ]
    assert pinned[0] != pinned[1]


def test_compose_cpu_profile_builds_and_runs_without_cuda() -> None:
    cpu = [s for s in services().values() if "cpu" in s.get("profiles", [])]
    assert len(cpu) == 1
    service = cpu[0]
    assert service["build"]["args"]["BACKEND"] == "cpu"
    assert "deploy" not in service
    assert environment(service)[f"{ENV_PREFIX}N_GPU_LAYERS"] == "0"


def test_compose_default_service_needs_no_profile_and_restarts() -> None:
    assert "profiles" not in services()["qwen3-moe-serve"]
    for name, service in services().items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name
    for name, service in server_services().items():
        # `docker compose stop` must wait out the server's drain before it kills.
        assert seconds(service["stop_grace_period"]) > Settings().shutdown_grace_s, name


def healthcheck_paths() -> dict[str, str]:
    """Every HTTP path a health probe asks, by where the probe is declared."""
    found: dict[str, str] = {}
    for name, service in services().items():
        check = service.get("healthcheck", {})
        if check.get("disable"):
            continue
        test = check["test"]
        assert test[0] == "CMD", name
        last = test[-1]
        found[f"compose:{name}"] = httpx.URL(last).path if "://" in last else last
    for line in dockerfile_instructions("HEALTHCHECK"):
        found["Dockerfile"] = json.loads(line.split("CMD", 1)[1])[-1]
    for document in k8s_documents():
        for container in pod_containers(document):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                found[f"k8s:{probe}"] = container[probe]["httpGet"]["path"]
    return found


@pytest.mark.anyio
async def test_every_health_probe_asks_a_real_route(client: httpx.AsyncClient) -> None:
    paths = healthcheck_paths()
    declared = {"Dockerfile", "compose:qwen3-moe-serve", "compose:lb", "k8s:readinessProbe"}
    assert declared <= set(paths)
    for path in set(paths.values()):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.json() == {"status": "ok"}


def test_ports_agree_everywhere() -> None:
    assert dockerfile_instructions("EXPOSE") == [str(SERVER_PORT)]
    assert f"{ENV_PREFIX}PORT={SERVER_PORT}" in dockerfile_env()
    for name, service in server_services().items():
        for mapping in service.get("ports", []):
            assert interpolate(mapping).rsplit(":", 1)[1] == str(SERVER_PORT), name
    # nginx: listens where compose publishes it, and proxies to the server port of each replica.
    config = NGINX.read_text(encoding="utf-8")
    listen = re.search(r"^\s*listen\s+(\d+);", config, re.MULTILINE)
    assert listen is not None
    lb_port = interpolate(services()["lb"]["ports"][0]).rsplit(":", 1)[1]
    assert listen.group(1) == lb_port
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", config, re.MULTILINE)
    assert upstreams and {port for _, port in upstreams} == {str(SERVER_PORT)}
    replicas = {name for name, s in services().items() if "scale" in s.get("profiles", [])}
    assert {host for host, _ in upstreams} == replicas - {"lb"}
    # Kubernetes: the container port, and the Service's target by name.
    deployment = k8s_kind("Deployment")
    (container,) = pod_containers(deployment)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"http": SERVER_PORT}
    (port,) = k8s_kind("Service")["spec"]["ports"]
    assert container_ports[port["targetPort"]] == SERVER_PORT


# -- Dockerfile and .dockerignore ---------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in "\n".join(lines).replace("\\\n", " ").splitlines() if line]


def dockerfile_instructions(keyword: str, stage: str | None = None) -> list[str]:
    found, current = [], None
    for line in dockerfile_lines():
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else None
        if word.upper() == keyword and (stage is None or current == stage):
            found.append(rest.strip())
    return found


def dockerfile_env(stage: str = "runtime") -> str:
    return " ".join(re.sub(r"\s+", " ", env) for env in dockerfile_instructions("ENV", stage))


def test_dockerfile_builds_cuda_in_one_stage_and_runs_from_another() -> None:
    stages = dockerfile_instructions("FROM")
    assert len(stages) >= 2
    named = {line.split(" AS ")[1]: line.split(" AS ")[0] for line in stages}
    assert named["build-cuda"].startswith("nvidia/cuda:") and "-devel-" in named["build-cuda"]
    assert named["runtime-cuda"].startswith("nvidia/cuda:") and "-runtime-" in named["runtime-cuda"]
    assert named["build"] == "build-${BACKEND}" and named["runtime"] == "runtime-${BACKEND}"
    assert {"build-cpu", "runtime-cpu"} <= set(named)
    assert stages[-1].endswith(" AS runtime"), "the runtime must be the default target"
    cuda_args = dockerfile_env("build-cuda")
    assert "-DGGML_CUDA=on" in cuda_args
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in cuda_args
    assert "-DGGML_CUDA=off" in dockerfile_env("build-cpu")
    args = {line.split("=")[0] for line in dockerfile_instructions("ARG")}
    assert {"BACKEND", "CUDA_VERSION", "CUDA_ARCHITECTURES"} <= args
    # Only the runtime stage copies from the builder, and only the environment.
    assert dockerfile_instructions("COPY", "runtime")[0] == "--from=build /opt/venv /opt/venv"


def test_dockerfile_builds_the_pinned_llama_cpp_python() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pinned = re.search(r'"llama-cpp-python==([\d.]+)"', pyproject)
    assert pinned is not None
    assert f"LLAMA_CPP_PYTHON_VERSION={pinned.group(1)}" in dockerfile_instructions("ARG")


def test_dockerfile_runs_as_an_unprivileged_user_with_a_healthcheck() -> None:
    users = dockerfile_instructions("USER", "runtime")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    uid = int(users[-1].split(":")[0])  # numeric, so Kubernetes can check runAsNonRoot
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    (healthcheck,) = dockerfile_instructions("HEALTHCHECK")
    assert "--start-period=" in healthcheck
    assert "QWEN3_MOE_SERVE_HOST=0.0.0.0" in dockerfile_env()


@pytest.mark.slow
def test_dockerfile_installs_the_commands_compose_runs() -> None:
    installed = {
        line.split()[-1].rsplit("/", 1)[1]: line.split()[-2]
        for line in dockerfile_instructions("COPY", "runtime")
        if "/usr/local/bin/" in line
    }
    assert installed == {
        "qwen3-moe-entrypoint": "deploy/entrypoint.sh",
        "qwen3-moe-healthcheck": "deploy/healthcheck.py",
        "qwen3-moe-rpc-worker": "deploy/rpc_worker.py",
    }
    assert dockerfile_instructions("ENTRYPOINT") == ['["qwen3-moe-entrypoint"]']
    used = {s["healthcheck"]["test"][1] for s in server_services().values()}
    used.add(services()["rpc-worker"]["command"][0])
    assert used <= set(installed)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        regex = "".join(
            ".*"
            if token == "**"
            else "[^/]*"
            if token == "*"
            else token
            if token.startswith("[")
            else re.escape(token)
            for token in re.split(r"(\*\*|\*|\[[^\]]*\])", body)
        )
        regex = regex.replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_the_sources_the_image_needs() -> None:
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "models/Qwen3-30B-A3B-Q4_K_M.gguf",
        "app/__pycache__/main.cpython-312.pyc",
        ".mypy_cache/3.11/app.json",
        ".pytest_cache/v/cache",
        "build/gpu-carry/wheels/x.whl",
        "tests/test_deploy.py",
        "app/model.gguf",
    ]:
        assert dockerignored(path), path
    sources = {
        source
        for line in dockerfile_instructions("COPY")
        if "--from=" not in line
        for source in line.split()[:-1]
        if not source.startswith("--")
    }
    assert {"pyproject.toml", "app", "deploy/entrypoint.sh"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), source
    assert not dockerignored("app/main.py")


# -- nginx ----------------------------------------------------------------------------------------


def nginx_directive(name: str) -> list[str]:
    config = NGINX.read_text(encoding="utf-8")
    return re.findall(rf"^\s*{name}\s+([^;]+);", config, re.MULTILINE)


def seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)([smh]?)", value.strip())
    assert match is not None, value
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_nginx_passes_server_sent_events_through_unbuffered() -> None:
    assert nginx_directive("proxy_buffering") == ["off"]
    assert nginx_directive("proxy_http_version") == ["1.1"]
    assert nginx_directive("proxy_set_header Connection") == ['""']
    assert seconds(nginx_directive("proxy_read_timeout")[0]) >= 3600
    assert seconds(nginx_directive("proxy_send_timeout")[0]) >= 3600
    assert nginx_directive("gzip") == ["off"]


def test_nginx_keeps_a_conversation_on_one_replica_and_retries_refusals_elsewhere() -> None:
    """The placement tests/test_replicas.py runs for real (where nginx is installed)."""
    config = NGINX.read_text(encoding="utf-8")
    assert nginx_directive("hash") == ["$affinity_key consistent"]
    assert not re.search(r"^\s*(least_conn|ip_hash|random)\b", config, re.MULTILINE)
    # Older Codex builds name the session in session_id.
    assert nginx_directive("underscores_in_headers") == ["on"]
    retried = set(nginx_directive("proxy_next_upstream")[0].split())
    assert {"error", "timeout", "http_502", "http_503", "http_429", "non_idempotent"} <= retried
    assert int(nginx_directive("proxy_next_upstream_tries")[0]) >= 2
    assert int(nginx_directive("keepalive")[0]) > 0


def test_deployment_docs_quote_the_committed_replicas_run() -> None:
    """docs/deployment.md's replica measurements are bench/results/replicas.json's, and the
    committed replicas.md is that JSON rendered."""
    results = json.loads((ROOT / "bench" / "results" / "replicas.json").read_text())
    report = (ROOT / "bench" / "results" / "replicas.md").read_text()
    assert replicas_report(results) == report
    docs = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    measured = docs[docs.index("**Measured** (`python -m bench.replicas`") :]
    assert f"commit {results['machine']['git_commit'][:7]}" in " ".join(measured.split())
    for row in results["setups"]:
        d, ttft, turn = row["decoded_per_turn"], row["ttft_s"], row["latency_s"]
        line = (
            f"| {row['label']} | {100 * row['cached_share']:.1f} % | {d['mean']:.0f} "
            f"| {ttft['p50']:.2f} / {ttft['p95']:.2f} | {turn['p50']:.2f} / {turn['p95']:.2f} "
            f"| {row['replica_changes']} of {row['turn_pairs']} |"
        )
        assert line in measured, line
    hashed = next(r for r in results["setups"] if r["balance"] is None and r["replicas"] == 2)
    assert hashed["cached_share"] >= 0.9 and hashed["errors"] == 0


# -- Kubernetes -----------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    documents = []
    for resource in kustomization["resources"]:
        text = (K8S / resource).read_text(encoding="utf-8")
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def k8s_kind(kind: str) -> dict[str, Any]:
    (document,) = [d for d in k8s_documents() if d["kind"] == kind]
    return document


def pod_containers(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] != "Deployment":
        return []
    containers: list[dict[str, Any]] = document["spec"]["template"]["spec"]["containers"]
    return containers


def test_k8s_manifests_parse_and_the_kustomization_lists_them_all() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {document["kind"] for document in k8s_documents()}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Ingress"} <= kinds


def test_k8s_deployment_takes_a_gpu_and_probes_health() -> None:
    deployment = k8s_kind("Deployment")
    (container,) = pod_containers(deployment)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a 17 GB load
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    names = {e["name"] for e in container["env"] if e["name"].startswith(ENV_PREFIX)}
    assert names <= fields, sorted(names - fields)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert k8s_kind("Service")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {v["name"] for v in spec["volumes"]} == set(mounts)
    # SIGTERM drains for shutdown_grace_s after the preStop pause: the kill must come later.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + Settings().shutdown_grace_s


def test_k8s_ingress_keeps_streams_unbuffered() -> None:
    annotations = k8s_kind("Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600


def nginx_conversation_headers() -> list[str]:
    """The header variables nginx.conf's map chain names a conversation by, in its order."""
    config = NGINX.read_text(encoding="utf-8")
    chain = re.findall(r"map \$(\w+) \$conversation_1|\"\"\s+\$(http_\w+);", config)
    return ["$" + (first or later) for first, later in chain]


def test_k8s_ingress_keys_a_conversation_as_nginx_conf_does() -> None:
    """The Ingress hashes the same conversation headers, in the same order, as nginx.conf,
    then the credential nginx.conf's fallback also uses."""
    headers = nginx_conversation_headers()
    assert headers[:2] == ["$http_x_claude_code_session_id", "$http_session_id"], headers
    annotations = k8s_kind("Ingress")["metadata"]["annotations"]
    key = annotations["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert key == "".join([*headers, "$http_authorization", "$http_x_api_key"])


# -- Kubernetes: the LLM-aware router (deploy/k8s/inference-gateway) -----------------------------

GATEWAY = K8S / "inference-gateway"
POOL_GROUP = "inference.networking.k8s.io"


def gateway_kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((GATEWAY / "kustomization.yaml").read_text())
    return loaded


def gateway_documents() -> list[dict[str, Any]]:
    """The overlay's own resources (the base it builds on is checked above)."""
    documents = []
    for resource in gateway_kustomization()["resources"]:
        if not resource.startswith(".."):
            text = (GATEWAY / resource).read_text(encoding="utf-8")
            documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def gateway_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (document,) = [
        d
        for d in gateway_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return document


def picker_args() -> dict[str, str]:
    (container,) = pod_containers(gateway_kind("Deployment"))
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


def picker_config() -> dict[str, Any]:
    """The EndpointPickerConfig, read where the picker's --config-file says."""
    deployment = gateway_kind("Deployment")
    (container,) = pod_containers(deployment)
    path = Path(picker_args()["config-file"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = gateway_kind("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    loaded: dict[str, Any] = yaml.safe_load(config_map["data"][path.name])
    return loaded


def test_k8s_gateway_overlay_builds_on_the_base_and_replaces_the_ingress() -> None:
    kustomization = gateway_kustomization()
    own = {r for r in kustomization["resources"] if not r.startswith("..")}
    assert set(kustomization["resources"]) - own == {"../"}
    assert own == {p.name for p in GATEWAY.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {d["kind"] for d in gateway_documents()}
    assert {"InferencePool", "Deployment", "Service", "ConfigMap", "HTTPRoute", "Gateway"} <= kinds
    # The Ingress would balance around the picker: the overlay deletes the base's.
    (patch,) = kustomization["patches"]
    assert patch["target"] == {"kind": "Ingress", "name": k8s_kind("Ingress")["metadata"]["name"]}
    deleted = yaml.safe_load(patch["patch"])
    assert deleted["$patch"] == "delete" and deleted["kind"] == "Ingress"


def test_k8s_inference_pool_is_the_server_pods_on_the_server_port() -> None:
    pool = gateway_kind("InferencePool")
    assert pool["apiVersion"] == f"{POOL_GROUP}/v1"
    server = k8s_kind("Deployment")
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == server["spec"]["selector"]["matchLabels"]
    assert selector.items() <= server["spec"]["template"]["metadata"]["labels"].items()
    # The picker's own pod is not one of the servers.
    picker = gateway_kind("Deployment")
    assert not selector.items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [SERVER_PORT]
    # The pool names the picker's Service, on the port where the picker serves ext-proc.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service"
    assert ref["failureMode"] in {"FailOpen", "FailClose"}
    service = gateway_kind("Service", ref["name"])
    assert service["spec"]["selector"] == picker["spec"]["selector"]["matchLabels"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    (container,) = pod_containers(picker)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == int(picker_args()["grpc-port"])
    assert ports["grpc-health"] == container["readinessProbe"]["grpc"]["port"]
    assert picker_args()["pool-name"] == pool["metadata"]["name"]
    assert picker_args()["pool-group"] == POOL_GROUP


def test_k8s_route_sends_every_request_to_the_pool_and_lets_streams_run() -> None:
    route = gateway_kind("HTTPRoute")
    (rule,) = route["spec"]["rules"]
    pool = gateway_kind("InferencePool")["metadata"]["name"]
    assert rule["backendRefs"] == [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    gateway = gateway_kind("Gateway")["metadata"]["name"]
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway]
    assert seconds(rule["timeouts"]["request"]) >= seconds(nginx_directive("proxy_read_timeout")[0])


def test_k8s_picker_may_watch_the_pool_and_its_pods() -> None:
    rules = gateway_kind("Role")["rules"]
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for needed in (("", "pods"), (POOL_GROUP, "inferencepools")):
        assert {"get", "list", "watch"} <= granted[needed], needed
    binding = gateway_kind("RoleBinding")
    assert binding["roleRef"]["name"] == gateway_kind("Role")["metadata"]["name"]
    account = gateway_kind("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert [s["name"] for s in binding["subjects"]] == [account]
    assert gateway_kind("ServiceAccount")["metadata"]["name"] == account


@pytest.mark.anyio
async def test_k8s_picker_reads_load_from_metrics_this_server_exports(
    client: httpx.AsyncClient,
) -> None:
    """The picker knows vLLM's metric names, not ours: its config maps each of its load
    signals to a gauge app/api/http/metrics.py really exports, on a route that answers."""
    config = picker_config()
    assert config["apiVersion"] == "llm-d.ai/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    source = plugins["metrics-data-source"]["parameters"]
    response = await client.get(source["path"])
    assert response.status_code == 200
    exported = set(re.findall(r"^# TYPE (\S+) gauge$", response.text, re.MULTILINE))
    extractor = plugins["core-metrics-extractor"]["parameters"]
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    engine = engines[extractor["defaultEngine"]]
    for signal_name in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        assert engine[signal_name] in exported, (signal_name, engine[signal_name], exported)
    assert not engine["loraSpec"] and not engine["cacheInfoSpec"]
    # Affinity: the prefix scorer outweighs the load scorers together.
    (profile,) = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight", 1) for p in profile["plugins"]}
    assert set(weights) <= set(plugins)
    load = weights["queue-scorer"] + weights["kv-cache-utilization-scorer"]
    assert weights["prefix-cache-scorer"] > load
    assert "approx-prefix-cache-producer" in plugins


# -- entrypoint and healthcheck, run for real -----------------------------------------------------


def run_entrypoint(env: Mapping[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3_")}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def entrypoint_environment(env: Mapping[str, str]) -> dict[str, str]:
    done = run_entrypoint(
        env,
        sys.executable,
        "-c",
        "import json, os; print(json.dumps({k: v for k, v in os.environ.items()"
        " if k.startswith('QWEN3_')}))",
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_entrypoint_unsets_empty_settings_so_defaults_apply() -> None:
    seen = entrypoint_environment({"QWEN3_MOE_SERVE_N_THREADS": "", "QWEN3_MOE_SERVE_N_CTX": "64"})
    assert seen == {"QWEN3_MOE_SERVE_N_CTX": "64"}


def test_entrypoint_falls_back_to_the_demo_model_only_when_allowed(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.gguf")
    assert entrypoint_environment({"QWEN3_MOE_SERVE_MODEL": missing}) == {}
    kept = {"QWEN3_MOE_SERVE_MODEL": missing, "QWEN3_DEMO_FALLBACK": "0"}
    assert entrypoint_environment(kept) == kept
    present = tmp_path / "present.gguf"
    present.write_bytes(b"GGUF")
    assert entrypoint_environment({"QWEN3_MOE_SERVE_MODEL": str(present)}) == {
        "QWEN3_MOE_SERVE_MODEL": str(present)
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthcheck(
    port: int, path: str = "/health", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), path],
        env={
            **clean,
            **(env or {}),
            "QWEN3_MOE_SERVE_PORT": str(port),
            "HTTP_PROXY": "http://0.0.0.0:9",
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.slow
def test_healthcheck_is_healthy_only_on_200(tmp_path: Path, live_server: LiveServer) -> None:
    assert healthcheck(live_server.port).returncode == 0
    assert healthcheck(live_server.port, "/no-such-route").returncode == 1
    assert healthcheck(free_port()).returncode == 1  # nothing listening
    # A model that fails to load leaves /health at 503: unhealthy, not starting forever.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with LiveServer(create_app(settings_for(model=broken))) as server:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = healthcheck(server.port)
    assert done.returncode == 1 and "503" in done.stdout


def settings_from_environment(env: Mapping[str, str]) -> Settings:
    """The settings a server reads from ``env``, an empty variable meaning unset."""
    values = {
        key.removeprefix(ENV_PREFIX).lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and value
    }
    return Settings.model_validate(values)


@pytest.mark.slow
def test_healthcheck_sends_the_api_key_to_a_server_that_protects_health(
    demo_backend: LlamaBackend, tmp_path: Path
) -> None:
    settings = settings_for(api_key="k1,k2", protect_health_metrics=True)
    with LiveServer(create_app(settings, backend=demo_backend)) as server:
        assert healthcheck(server.port).returncode == 1  # no key: 401
        keys = tmp_path / "keys"
        keys.write_text("# rotated weekly\nk2\n", encoding="utf-8")
        for env in (
            {"QWEN3_MOE_SERVE_API_KEY": "k1,k2"},
            {"QWEN3_MOE_SERVE_API_KEY_FILE": str(keys)},
        ):
            assert healthcheck(server.port, env=env).returncode == 0, env


@pytest.mark.slow
def test_compose_environment_through_the_entrypoint_serves_and_stops(
    tmp_path: Path, demo_backend: LlamaBackend
) -> None:
    """compose.yaml's environment, as given, through the image's entrypoint and healthcheck.

    The configured model is absent here, so the demo model is served: its answer must equal that
    of an in-process app with the same settings around the demo model. SIGTERM must stop the
    server itself (the entrypoint execs it).
    """
    port = free_port()
    env = environment(services()["qwen3-moe-serve"])
    env.update(
        {
            f"{ENV_PREFIX}HOST": "127.0.0.1",
            f"{ENV_PREFIX}PORT": str(port),
            f"{ENV_PREFIX}CACHE_DIR": str(tmp_path / "cache"),
            "PATH": f"{SERVER.parent}{os.pathsep}{os.environ['PATH']}",
        }
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3_")}
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT)], env={**clean, **env}, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while healthcheck(port).returncode != 0:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        served = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=HELLO, timeout=120)
        assert served.status_code == 200, served.text
        assert served.json()["model"] == "qwen3-moe-demo"
        expected = settings_from_environment(env).model_copy(update={"model": None})
        with LiveServer(create_app(expected, backend=demo_backend)) as reference:
            local = httpx.post(f"{reference.url}/v1/chat/completions", json=HELLO, timeout=120)
        assert served.json()["choices"] == local.json()["choices"]
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
    output = log.read_text()
    assert "serving the demo model instead" in output
    # exec: the shell's process became the server, so the signal reached uvicorn, which shut
    # down cleanly (and, like uvicorn does, re-raised the signal it was stopped by).
    assert f"Started server process [{process.pid}]" in output
    assert "Finished server process" in output
    assert returncode in {0, -signal.SIGTERM}, output


# -- RPC: a model larger than one machine ---------------------------------------------------------


def test_rpc_servers_setting_takes_host_port_lists() -> None:
    assert Settings(rpc_servers=" 10.0.0.2:50052, gpu-b:50052 ").rpc_servers == (
        "10.0.0.2:50052,gpu-b:50052"
    )
    assert Settings(rpc_servers="").rpc_servers is None
    for wrong in ("10.0.0.2", ":50052", "host:0", "host:65536", "[::1]:50052", "host:x"):
        with pytest.raises(ValueError, match="host:port"):
            Settings(rpc_servers=wrong)


def rpc_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


@pytest.mark.slow
def test_rpc_server_that_cannot_be_used_is_an_error_not_an_abort() -> None:
    """ggml aborts the process when it cannot reach an RPC server; we must raise first.

    Run in a child process, so that an abort (or a registration) cannot touch this one.
    """
    code = (
        "from app.engine.rpc import register_rpc_servers\n"
        "try:\n"
        f"    register_rpc_servers(['127.0.0.1:{free_port()}'])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    if rpc_supported():
        assert done.stdout.startswith("ConnectionError RPC server 127.0.0.1:"), done.stdout
    else:
        assert done.stdout.startswith("RuntimeError"), done.stdout
        assert "-DGGML_RPC=on" in done.stdout


@dataclass
class _Output:
    """A child process's output lines, read as they come."""

    lines: list[str] = field(default_factory=list)

    def follow(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def rpc_worker() -> Iterator[tuple[str, _Output]]:
    if not rpc_supported():
        pytest.skip("llama-cpp-python here was built without -DGGML_RPC=on")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(RPC_WORKER), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _Output()
    threading.Thread(target=output.follow, args=(process.stdout,), daemon=True).start()
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert process.poll() is None, output.lines
        assert time.monotonic() < deadline, output.lines
        time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}", output
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, output.lines


@pytest.mark.slow
def test_rpc_worker_serves_the_model_to_a_server(
    rpc_worker: tuple[str, _Output], demo_model_path: Path, demo_backend: LlamaBackend
) -> None:
    """The server started with --rpc-servers keeps a connection to the worker for its layers,
    and answers exactly what the same model answers without RPC."""
    endpoint, worker = rpc_worker
    port = free_port()
    flags = {"--model": str(demo_model_path), "--port": str(port), "--rpc-servers": endpoint}
    flags.update({"--n-gpu-layers": "-1", "--n-ctx": "2048"})
    process = subprocess.Popen(
        [str(SERVER), *(item for pair in flags.items() for item in pair)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("QWEN3_")},
    )
    server = _Output()
    threading.Thread(target=server.follow, args=(process.stdout,), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while healthcheck(port).returncode != 0:
            assert process.poll() is None, server.lines
            assert time.monotonic() < deadline, server.lines
            time.sleep(0.2)
        # Reachability check and registration each open and close a connection; the model's
        # buffers hold one open for as long as it is loaded.
        deadline = time.monotonic() + 10
        while worker.count("Accepted client connection") - worker.count("connection closed") != 1:
            assert time.monotonic() < deadline, worker.lines
            time.sleep(0.1)
        served = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=HELLO, timeout=120)
        assert served.status_code == 200, served.text
        expected = Settings(model=demo_model_path, n_ctx=2048)
        with LiveServer(create_app(expected, backend=demo_backend)) as reference:
            local = httpx.post(f"{reference.url}/v1/chat/completions", json=HELLO, timeout=120)
        assert served.json()["choices"] == local.json()["choices"]
        assert server.count(f"RPC server {endpoint} registered") == 1, server.lines
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# -- scripts --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stream_bench_times_a_real_stream(live_server: LiveServer) -> None:
    bench = ["-m", "bench.stream"]
    done = subprocess.run(
        [sys.executable, *bench, "--url", live_server.url, "--requests=2", "--max-tokens=16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["content_events"] > 0 and run["ttft_s"] > 0
        assert run["completion_tokens"] >= run["content_events"]
    assert result["median_ttft_s"] > 0


@pytest.mark.slow
def test_gpu_check_without_a_gpu_fails_at_the_first_step_and_still_reports(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_DIR": str(tmp_path / "work"),
        "GPU_CARRY": str(tmp_path / "no-carry"),
        "GPU_CHECK_STEPS": "env build",
        # No nvidia-smi anywhere on this PATH, whatever the machine has.
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "PYTHON": sys.executable,
    }
    (tmp_path / "bin").mkdir()
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.fail("this test needs a PATH without nvidia-smi")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] is False
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("env", "failed")]
    assert "stopping" in done.stdout


def lint_tool(name: str) -> str:
    path = shutil.which(name, path=str(SERVER.parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


@pytest.mark.slow
def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [ENTRYPOINT, *sorted((ROOT / "scripts").glob("*.sh"))]
    done = subprocess.run(
        [lint_tool("shellcheck"), "-x", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [lint_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_deploy_and_script_python_is_lint_clean() -> None:
    paths = [str(ROOT / "deploy"), str(ROOT / "scripts")]
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *paths],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if "No module named ruff" in done.stderr:
            pytest.skip("ruff is not installed (make test installs it)")
        assert done.returncode == 0, done.stdout + done.stderr
