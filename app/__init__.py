"""qwen3-moe-serve: an OpenAI-compatible server for Qwen3-MoE GGUF models.

Data flows one way: HTTP route -> request schema -> generation service -> backend adapter ->
llama.cpp; tokens come back through a single callback, ``on_token(token_id) -> bool``.
"""

__version__ = "0.1.0"
