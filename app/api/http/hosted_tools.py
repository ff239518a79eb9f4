"""Tools a request offers that this server cannot run: hosted tools, server tools, connectors.

Agents offer them by default (Codex CLI sends a ``web_search`` tool with every request, Claude
Code's web search is Anthropic's ``web_search_*`` server tool), and a model served here can
only call function tools. The choice: leave such a tool out of the prompt, so the model never
sees a tool it cannot call, serve the request, and say so (one info line per request naming
the types, and the ``unsupported_tools_dropped`` counter). The alternative rejected as the
default: a 400, which made Codex CLI with its default configuration exit 1 on its first turn
while llama-server answered it; ``--reject-unsupported-tools`` restores it for operators who
would rather a client learn that its tool is not there.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from fastapi import Request

from app.api.http.metrics import Metrics
from app.errors import InvalidRequest

logger = logging.getLogger(__name__)

_FAMILIES = frozenset(
    {
        # OpenAI Responses hosted and special tools
        "web_search", "web_search_preview", "file_search", "computer_use", "computer_use_preview",
        "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "custom",
        "tool_search", "apply_patch",
        # Anthropic server tools (versioned: web_search_20250305 is web_search)
        "web_fetch", "code_execution", "bash", "text_editor", "computer", "memory",
        "mcp_connector",
    }
)  # fmt: skip
_VERSION = re.compile(r"_\d{8}$")


def family(kind: str) -> str:
    """The metric label for a tool type: a known family (a version date cut off), else
    ``other``, so a client's made-up type names cannot grow the label set."""
    base = _VERSION.sub("", kind)
    return base if base in _FAMILIES else "other"


@dataclass
class UnsupportedTools:
    """Collects, while a request is translated, the tools it offers that cannot run here."""

    reject: bool
    """``--reject-unsupported-tools``: refuse the request instead of leaving the tool out."""
    dropped: list[str] = field(default_factory=list)
    """The types left out, in request order."""

    def leave_out(self, where: str, kind: str, what: str) -> None:
        """``where`` (a request path) is a tool of type ``kind``; ``what`` names the kind of
        tool in the refusal (``a 'web_search' tool``)."""
        if self.reject:
            raise InvalidRequest(
                f"{where} is {what}, which this server cannot run (it runs function tools "
                "only). Leave it out of the request, or start the server without "
                "--reject-unsupported-tools to have such tools left out of the prompt.",
                param=where,
                code="unsupported_tool",
            )
        self.dropped.append(kind)

    def report(self, request: Request, api: str) -> None:
        """The one log line and the counts for this request, if it offered any such tool."""
        if not self.dropped:
            return
        logger.info(
            "%s %s: left out %d tool(s) this server cannot run: %s",
            request.method,
            request.url.path,
            len(self.dropped),
            ", ".join(sorted({kind[:64] for kind in self.dropped})),
        )
        metrics: Metrics = request.app.state.metrics
        for kind in self.dropped:
            metrics.unsupported_tools_dropped.labels(api=api, type=family(kind)).inc()
