"""OpenAI chat and text completions: request bodies (``requests``), response objects
(``objects``), their chunk shapes (``formats``), the wire (``wire``) and the routes."""
