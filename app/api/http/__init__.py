"""Shared HTTP pieces of every API: SSE framing, error handlers, API keys and size limits,
metrics, access logs, connection timeouts, route dependencies, the generation driver and the
``Wire`` protocol each API answers through."""
