"""The HTTP edge: one router per API (``chat``, ``completions``, ``ops``), the wire types
(``schemas``), the chunk and response shapes (``formats``), SSE framing, the error handlers,
security and observability. Routes are thin: parse, prepare through the service, answer as
JSON or SSE (``generation``). Nothing is imported here, so ``app.core`` can use the wire types
without pulling the routes in."""
