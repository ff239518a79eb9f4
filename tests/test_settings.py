"""Settings: one class behind the flags, the environment and ``--help``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import parse_settings
from app.settings import ENV_PREFIX, Settings


def test_flags_set_every_model_level_setting(tmp_path: Path) -> None:
    model = tmp_path / "Qwen3-30B-A3B-Q4_K_M.gguf"
    settings = parse_settings(
        [
            "--model", str(model), "--model-alias", "qwen3", "--n-ctx", "8192",
            "--n-gpu-layers", "20", "--n-threads", "6", "--n-batch", "1024",
            "--flash-attn", "off", "--chat-template-file", str(tmp_path / "t.jinja"),
            "--host", "0.0.0.0", "--port", "9000",
        ]
    )  # fmt: skip
    assert settings.model == model
    assert (settings.model_alias, settings.n_ctx, settings.n_gpu_layers) == ("qwen3", 8192, 20)
    assert (settings.n_threads, settings.n_batch, settings.flash_attn) == (6, 1024, "off")
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)


def test_environment_uses_one_prefix_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}N_CTX", "1234")
    monkeypatch.setenv(f"{ENV_PREFIX}PORT", "8100")
    settings = parse_settings(["--port", "8200"])
    assert (settings.n_ctx, settings.port) == (1234, 8200)


def test_defaults_serve_the_demo_model_on_loopback_with_all_layers_on_gpu() -> None:
    settings = Settings()
    assert settings.model is None
    assert (settings.host, settings.port, settings.n_gpu_layers) == ("127.0.0.1", 8000, -1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("on", "on"), ("OFF", "off"), ("true", "on"), ("false", "off")],
)
def test_flash_attention_is_auto_by_default_and_takes_switch_words(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    assert Settings().flash_attn == "auto"
    monkeypatch.setenv(f"{ENV_PREFIX}FLASH_ATTN", value)
    assert parse_settings([]).flash_attn == expected


def test_flash_attention_rejects_other_words() -> None:
    with pytest.raises(ValueError, match="flash_attn"):
        Settings.model_validate({"flash_attn": "sometimes"})


def test_help_documents_every_setting() -> None:
    script = Path(sys.executable).with_name("qwen3-moe-serve")
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out, name


def test_invalid_setting_is_a_clear_error() -> None:
    script = Path(sys.executable).with_name("qwen3-moe-serve")
    done = subprocess.run(
        [str(script), "--n-ctx", "-5"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "n_ctx" in done.stderr and "Traceback" not in done.stderr


def test_chat_template_file_overrides_the_gguf_template(
    tmp_path: Path, demo_model_path: Path
) -> None:
    from app.engine import load_backend

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}", encoding="utf-8")
    settings = Settings(model=demo_model_path, chat_template_file=template, n_ctx=512)
    backend = load_backend(settings, demo_model_path)
    try:
        assert backend.info.chat_template == template.read_text(encoding="utf-8")
    finally:
        backend.close()
