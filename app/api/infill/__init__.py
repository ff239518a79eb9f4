"""Editor code completion, llama-server's ``/infill``: request bodies (``requests``), the wire
(``wire``) and the route."""
