"""Anthropic's Messages API: request bodies and their translation (``requests``), the wire
(``wire``) and the routes."""
