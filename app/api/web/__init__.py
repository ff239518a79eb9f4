"""The chat page at ``/``: one page and its scripts, shipped in the package, served from this
origin only (``--no-web-page`` turns it off)."""
