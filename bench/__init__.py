"""Benchmarks of this server against its peers on the same GGUF and machine (``make bench``).

``python -m bench`` is the entry point (``bench.run``). ``bench/batching.py`` is a separate,
older script about continuous batching; it shares nothing with this package.
"""
