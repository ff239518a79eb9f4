"""The README and docs/ are a front door that must keep working: the settings reference is the
code's, every link resolves, and every command they show is one a user can paste."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from app.settings import ENV_PREFIX, Settings
from app.settings_reference import COMMAND, settings_table, with_settings_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```(?:sh|console|bash)\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _commands(page: Path) -> list[str]:
    """Every command line of the page's shell blocks (``$ `` prompts stripped, comments cut,
    continuation lines joined)."""
    lines: list[str] = []
    for block in CODE_BLOCK.findall(page.read_text(encoding="utf-8")):
        pending = ""
        for raw in block.splitlines():
            line = raw.removeprefix("$ ").split("  #")[0].rstrip()
            if raw.startswith(("data:", "{", "  ")) and not pending:
                continue  # output shown after a command, not a command
            pending += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                if pending.strip() and not pending.lstrip().startswith("#"):
                    lines.append(pending.strip())
                pending = ""
    return lines


def test_the_settings_reference_is_generated_from_the_settings() -> None:
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert with_settings_table(page) == page, f"docs/settings.md is stale: run .venv/bin/{COMMAND}"
    table = settings_table()
    for name in Settings.model_fields:
        assert f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` |" in table, name


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_names_real_targets_modules_and_flags(page: Path) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    flags = {f"--{name.replace('_', '-')}" for name in Settings.model_fields}
    flags |= {f"--no-{name.replace('_', '-')}" for name, f in Settings.model_fields.items()
              if f.annotation in (bool, "bool")}  # fmt: skip
    for command in _commands(page):
        for target in re.findall(r"(?:^|&& |; )make ([a-z][\w-]*)", command):
            assert target in targets, f"{page.name}: make {target} (not a Makefile target)"
        for module in re.findall(r"python3? -m ([\w.]+)", command):
            if module.split(".")[0] in {"app", "bench"}:
                assert importlib.util.find_spec(module) is not None, f"{page.name}: {module}"
        if re.search(r"(^|/|\s)qwen3-moe-serve\s", command + " ") and "docker" not in command:
            for flag in re.findall(r"\s(--[a-z][\w-]*)", command):
                assert flag in flags or flag == "--help", f"{page.name}: {flag} in {command!r}"


def test_the_readme_is_a_front_door() -> None:
    """A few screens: what it is, the two commands, a short transcript, the architecture."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    assert "make serve" in readme and "make test" in readme
    transcript = readme.split("```console", 1)[1].split("```", 1)[0]
    assert 4 <= transcript.count("data: ") <= 6
    assert "## Architecture" in readme
