#!/usr/bin/env python3
"""Container health probe: ``qwen3-moe-healthcheck [PATH]`` exits 0 when the server answers 200.

The image has Python and no curl, so the probe is Python's own HTTP client. It asks the server
in the same container on 127.0.0.1 at ``QWEN3_MOE_SERVE_PORT`` (the setting the server itself
reads), so changing the port cannot leave the probe knocking on the old one. Proxy variables
are ignored: a probe of localhost must never travel through ``HTTP_PROXY``.

``/health`` answers 503 while the model loads and after a failed load, so a container is
"starting" during the HEALTHCHECK start period and "unhealthy" if the load failed. A server
that also protects /health with its API key (QWEN3_MOE_SERVE_PROTECT_HEALTH_METRICS) is sent
the first key it accepts, read the way the server reads its keys.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 4.0


def _headers() -> dict[str, str]:
    inline = os.environ.get("QWEN3_MOE_SERVE_API_KEY")
    key_file = os.environ.get("QWEN3_MOE_SERVE_API_KEY_FILE")
    if not (inline or key_file):
        return {}
    from app.api.http.security import load_api_keys

    keys = load_api_keys(inline, Path(key_file) if key_file else None)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    port = os.environ.get("QWEN3_MOE_SERVE_PORT") or "8000"
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        request = urllib.request.Request(url, headers=_headers())
        with opener.open(request, timeout=TIMEOUT_S) as response:
            status = int(response.status)
            body = response.read(200).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(200).decode("utf-8", "replace")
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {status} {body}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
