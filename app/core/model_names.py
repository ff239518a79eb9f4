"""Which model names a request may use: the served model's id and alias, or any name with
``--accept-any-model``. Editors' ``/infill`` requests send names of their own and are served
anyway; each such name is logged once (the first few)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from app.errors import NotFound

logger = logging.getLogger(__name__)

INFILL_NAMES_LOGGED = 16


class ModelNames:
    def __init__(self, names: Sequence[str], *, accept_any: bool = False) -> None:
        self.model_id = names[0]
        self._names = frozenset(names)
        self._accept_any = accept_any
        self._foreign: set[str] = set()

    def check(self, requested: str | None) -> None:
        """404 unless the request names the served model or its alias (or names none), or the
        server accepts any name."""
        if requested and not self._accept_any and requested not in self._names:
            raise NotFound(
                f"The model '{requested}' does not exist; this server serves '{self.model_id}' "
                "(start it with --accept-any-model to answer any model name with it).",
                param="model",
                code="model_not_found",
            )

    def note_editor_name(self, name: str | None) -> None:
        """Say once per name (for the first few names) that an editor's model name was not
        this server's and the request was served by it anyway."""
        if not name or name in self._names or name in self._foreign:
            return
        if len(self._foreign) < INFILL_NAMES_LOGGED:
            self._foreign.add(name)
            logger.info(
                "/infill named the model '%s'; served by '%s' (editors send names of their own)",
                name[:200],
                self.model_id,
            )
