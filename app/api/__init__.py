"""The HTTP edge: one router per API (``chat``, ``completions``, ``responses``, ``messages``,
``ops``); for OpenAI's chat and text completions the wire types (``schemas``) and chunk shapes
(``formats``); for the Responses and Anthropic Messages APIs a request module each
(``responses_request``, ``messages_request``: the request and its translation into a chat
request) and a wire each (``responses_format``, ``messages_format``); the ``Wire`` protocol
every API answers through (``wire``), the answer's blocks (``blocks``), per-token JSON
templates (``templates``), SSE framing, the error handlers, security and observability.
Routes are thin: parse, prepare through the service, answer as JSON or SSE
(``generation``). Nothing is imported here, so ``app.core`` can use the wire types without
pulling the routes in."""
