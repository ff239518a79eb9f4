"""``GET /``: a chat page that talks to this server's own ``/v1/chat/completions``.

The page and its assets are files of the package (``static/``), read once and served from a
fixed table, so no request path ever reaches the file system. Nothing is loaded from
elsewhere: the server often runs offline, and the Content-Security-Policy allows this origin
only (no inline script, no remote anything). The page holds no secret: with API keys on it
loads without one, and the API it calls asks for the key as it does of any client. Markdown is
rendered by marked and sanitized by DOMPurify, pinned copies with their licences in
``static/vendor/``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

STATIC = files("app.api.web") / "static"

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/web/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/web/vendor/marked.umd.js": ("vendor/marked.umd.js", "text/javascript; charset=utf-8"),
    "/web/vendor/purify.min.js": ("vendor/purify.min.js", "text/javascript; charset=utf-8"),
    "/web/vendor/marked.LICENSE.txt": ("vendor/marked.LICENSE.txt", "text/plain; charset=utf-8"),
    "/web/vendor/dompurify.LICENSE.txt": (
        "vendor/dompurify.LICENSE.txt",
        "text/plain; charset=utf-8",
    ),
}
"""Every path the page is made of: the only paths this router answers."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def web_router() -> APIRouter:
    """The page's routes."""
    router = APIRouter()
    for path, (name, media_type) in ASSETS.items():
        router.add_api_route(
            path,
            _serve(_asset(name), media_type),
            methods=["GET"],
            include_in_schema=False,
            response_class=Response,
        )
    return router


@cache
def _asset(name: str) -> bytes:
    """A file of the page, read once per process (every app built shares it)."""
    return (STATIC / name).read_bytes()


def _serve(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve
