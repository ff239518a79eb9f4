"""OpenAI's Responses API: request bodies and their translation (``requests``), the wire
(``wire``) and the route."""
