"""The generation core: a request prepared into engine terms (``prepare``), admitted
(``admission``), run on the engine with its output queued for the response (``service``,
``output``), and the result types the formats read (``results``)."""
