"""The generation core: requests in its own types (``requests``; each API translates its
wire into them), prepared into engine terms by a few units behind ``prepare.Preparer``,
admitted (``admission``), run on the engine with its output queued for the response
(``service``, ``output``), and the result types the wires read (``results``). It imports
nothing from ``app.api``."""
