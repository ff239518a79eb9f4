"""``python -m app.demo --out PATH [--n-ctx N]``: write the scripted demo model to a file.

``make serve`` without ``--model`` builds the same model into the cache directory on its own;
this is for inspecting it or serving it elsewhere. Random bench models: ``python -m bench.model``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from app.demo.scripted import write_demo_model

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the demo model, log where and how large; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m app.demo",
        description="Write the scripted demo model (random bench models: python -m bench.model).",
    )
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context length (default 4096)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    path = write_demo_model(args.out, n_ctx=args.n_ctx)
    logger.info(
        "wrote %s (%.1f MB) in %.2f s",
        path,
        path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return 0
