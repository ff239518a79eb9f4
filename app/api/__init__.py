"""The HTTP edge: one package per API (``openai``: chat and text completions; ``responses``;
``anthropic``: Messages; ``infill``: editor completion), each with its request bodies, its
wire and its routes; ``http`` holds what they share, ``ops`` the model list, health and
metrics. Routes are thin: parse, prepare through the service, answer as JSON or SSE."""
