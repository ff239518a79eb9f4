"""The contract schema, the loader for ``contracts/*.yaml``, and the binding check.

A contract is a set of falsifiable claims about the service. Each falsifier has a stable id that
tests name in ``@pytest.mark.falsifies(...)``; numeric limits live in the falsifier's
``thresholds`` so that a test reads them instead of repeating them.

Every model forbids unknown keys. The alternative rejected is the permissive loader of the
system this project descends from, which silently dropped a misspelt ``falsifiers:`` key and so
let a contract claim things that nothing ever checked. Here a typo is an error that stops the
test run.

This module knows nothing about pytest: the plugin (``tests/contracts_plugin.py``) feeds it the
markers it collected and turns the problems it returns into a failed run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

# semver.org's published pattern (no leading zeros, optional pre-release and build metadata).
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
CONTRACT_ID = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_V(?P<major>[0-9]+)$")

Text = Annotated[str, Field(min_length=1)]
Threshold = StrictInt | StrictFloat


class Falsifier(BaseModel):
    """One claim and the observation that would refute it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=r"^[A-Z0-9_]+_[0-9]{3}$")]
    claim: Text
    falsified_if: Text
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    rationale: Text | None = None
    """Why a threshold has the value it has (required whenever there are thresholds)."""

    @model_validator(mode="after")
    def _thresholds_are_explained(self) -> Falsifier:
        if self.thresholds and self.rationale is None:
            raise ValueError(f"{self.id}: thresholds need a rationale saying where they come from")
        return self


class Contract(BaseModel):
    """A versioned set of falsifiers governing some modules of ``app/``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=CONTRACT_ID.pattern)]
    version: Annotated[str, Field(pattern=SEMVER.pattern)]
    description: Text
    scope: Annotated[list[Text], Field(min_length=1)]
    """Paths, relative to the repository root, of the modules the contract governs."""
    equations: Annotated[dict[str, Text], Field(min_length=1)]
    falsifiers: Annotated[list[Falsifier], Field(min_length=1)]

    @model_validator(mode="after")
    def _ids_are_consistent(self) -> Contract:
        match = CONTRACT_ID.match(self.id)
        assert match is not None  # the field pattern already holds
        if match["major"] != self.version.split(".")[0]:
            raise ValueError(
                f"id {self.id} says major version {match['major']} but version is {self.version}"
            )
        seen: set[str] = set()
        for falsifier in self.falsifiers:
            if not re.fullmatch(rf"{self.id}_[0-9]{{3}}", falsifier.id):
                raise ValueError(f"falsifier id {falsifier.id} must be {self.id}_NNN")
            if falsifier.id in seen:
                raise ValueError(f"falsifier id {falsifier.id} appears twice")
            seen.add(falsifier.id)
        return self

    @property
    def file_name(self) -> str:
        """The file a contract must live in: its id in lower kebab case."""
        return self.id.lower().replace("_", "-") + ".yaml"


@dataclass(frozen=True)
class LoadedContract:
    contract: Contract
    path: Path


@dataclass(frozen=True)
class Contracts:
    """Every contract that validated, and a message for every file that did not."""

    loaded: tuple[LoadedContract, ...]
    errors: tuple[str, ...]

    def falsifiers(self) -> dict[str, tuple[LoadedContract, Falsifier]]:
        return {f.id: (lc, f) for lc in self.loaded for f in lc.contract.falsifiers}


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<top level>"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def load_contract(path: Path, root: Path) -> Contract:
    """One contract file, validated; raises ``ValueError`` with the file's problems."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("a contract is a YAML mapping")
    try:
        contract = Contract.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None
    if path.name != contract.file_name:
        raise ValueError(f"contract {contract.id} must be in a file named {contract.file_name}")
    missing = [entry for entry in contract.scope if not (root / entry).exists()]
    if missing:
        raise ValueError(f"scope names paths that do not exist: {', '.join(missing)}")
    return contract


def load_contracts(directory: Path, root: Path) -> Contracts:
    """Every ``*.yaml`` in ``directory``; an empty or missing directory is itself an error."""
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        return Contracts((), (f"no contract files in {directory}",))
    loaded: list[LoadedContract] = []
    errors: list[str] = []
    owner: dict[str, Path] = {}
    for path in files:
        try:
            contract = load_contract(path, root)
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
            continue
        if contract.id in owner:
            errors.append(f"{path}: contract id {contract.id} is also used by {owner[contract.id]}")
            continue
        owner[contract.id] = path
        loaded.append(LoadedContract(contract, path))
    return Contracts(tuple(loaded), tuple(errors))


def check_bindings(
    contracts: Contracts, bindings: Mapping[str, Iterable[str]], *, complete: bool
) -> list[str]:
    """Problems with how collected tests (node id -> falsifier ids) bind to the contracts.

    A marker naming an unknown falsifier is always a problem. A falsifier that no collected
    test names is one only when ``complete`` says the whole test tree was collected: a run of
    one file cannot tell an unbound falsifier from one bound in a file it did not collect.
    """
    known = contracts.falsifiers()
    problems = [
        f"{nodeid} falsifies unknown id {falsifier_id}"
        for nodeid, ids in sorted(bindings.items())
        for falsifier_id in sorted(set(ids))
        if falsifier_id not in known
    ]
    if complete:
        bound = {falsifier_id for ids in bindings.values() for falsifier_id in ids}
        problems.extend(
            f"{falsifier_id} ({loaded.path.name}) is bound to no test"
            for falsifier_id, (loaded, _) in known.items()
            if falsifier_id not in bound
        )
    return problems
