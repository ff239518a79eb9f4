"""Tiny but real ``qwen3moe`` GGUF files that llama.cpp loads and runs, written weight by weight.

The project tests and demonstrates itself on models it builds (no download, no fake engine):
``scripted`` is the demo model whose greedy answer is a known script; ``vocab`` the Qwen3
tokenizer family; ``writer`` the one GGUF writer; ``cache`` the content-keyed, atomic cache.
``bench.model`` writes its random-weight models through the same ``vocab``, ``writer`` and
``cache``. ``python -m app.demo --out PATH`` writes the demo model to a file.
"""

from app.demo.cache import GENERATOR_VERSION
from app.demo.scripted import DEFAULT_SCRIPT, ensure_demo_model, script_text, write_demo_model
from app.demo.writer import ChatTemplateName

__all__ = [
    "DEFAULT_SCRIPT",
    "GENERATOR_VERSION",
    "ChatTemplateName",
    "ensure_demo_model",
    "script_text",
    "write_demo_model",
]
