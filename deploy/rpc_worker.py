#!/usr/bin/env python3
"""``qwen3-moe-rpc-worker``: lend this machine's GPUs to a server on another machine.

A model larger than one machine is split with llama.cpp's RPC backend: every extra machine runs
a worker, and the server is started with ``QWEN3_MOE_SERVE_RPC_SERVERS=host:port,...``; its
layers are then spread over the workers' devices and its own.

llama.cpp ships a ``rpc-server`` program for this, but client and server must come from the
same ggml version (the handshake refuses any other), and a separately built binary drifts from
the llama-cpp-python in the server image. This worker starts the RPC server of the ggml library
inside the installed llama-cpp-python instead, so an image is its own matching worker.

The RPC protocol has neither authentication nor encryption: bind it to a private network only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

# ggml's enum ggml_backend_dev_type
_DEVICE_CPU, _DEVICE_GPU = 0, 1

_StartServer = ctypes.CFUNCTYPE(
    None,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)


def _ggml() -> ctypes.CDLL:
    """ggml, as llama-cpp-python's libllama sees it.

    Symbols are looked up through libllama's handle, which resolves them in the libggml it
    links: the wheel holds libggml.so and libggml.so.0 as separate files, and opening the former
    by path would load a second copy of ggml with a registry of its own.
    """
    import llama_cpp

    lib: ctypes.CDLL = llama_cpp.llama_cpp._lib
    signatures: dict[str, tuple[list[type], type | None]] = {
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
        "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
        "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


def _devices(lib: ctypes.CDLL) -> list[tuple[str, str, int, int]]:
    """(name, description, type, handle) of every ggml device, RPC clients excluded."""
    devices = []
    for index in range(lib.ggml_backend_dev_count()):
        handle = lib.ggml_backend_dev_get(index)
        name = lib.ggml_backend_dev_name(handle).decode()
        if name.startswith("RPC"):
            continue
        description = lib.ggml_backend_dev_description(handle).decode()
        devices.append((name, description, lib.ggml_backend_dev_type(handle), handle))
    return devices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-moe-rpc-worker",
        description="Lend this machine's devices to a qwen3-moe-serve elsewhere (llama.cpp RPC).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    parser.add_argument(
        "--device",
        action="append",
        help="ggml device to lend, e.g. CUDA0 or CPU (repeatable; default: every GPU, "
        "else the CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)"
    )
    parser.add_argument(
        "--cache-dir", help="keep large tensors here so a restarted server sends them once"
    )
    parser.add_argument("--list-devices", action="store_true", help="list devices and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lib = _ggml()
    devices = _devices(lib)
    if args.list_devices:
        for name, description, _, _ in devices:
            print(f"{name}: {description}")
        return 0
    if args.device:
        by_name = {device[0]: device for device in devices}
        unknown = [name for name in args.device if name not in by_name]
        if unknown:
            known = ", ".join(by_name)
            print(f"qwen3-moe-rpc-worker: unknown device {unknown} (have {known})", file=sys.stderr)
            return 2
        chosen = [by_name[name] for name in args.device]
    else:
        chosen = [d for d in devices if d[2] == _DEVICE_GPU] or [
            d for d in devices if d[2] == _DEVICE_CPU
        ]
    rpc = lib.ggml_backend_reg_by_name(b"RPC")
    address = rpc and lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_start_server")
    if not address:
        print(
            "qwen3-moe-rpc-worker: llama-cpp-python was built without -DGGML_RPC=on",
            file=sys.stderr,
        )
        return 2
    start_server = _StartServer(address)
    handles = (ctypes.c_void_p * len(chosen))(*(d[3] for d in chosen))
    endpoint = f"{args.host}:{args.port}".encode()
    cache_dir = args.cache_dir.encode() if args.cache_dir else None
    print(
        f"qwen3-moe-rpc-worker: serving {', '.join(d[0] for d in chosen)} "
        f"on {args.host}:{args.port}",
        flush=True,
    )

    # The server loop never returns to Python, and Python runs signal handlers only between
    # its own instructions: the loop gets a thread and the main thread waits for signals.
    # (ctypes releases the GIL for the foreign call.)
    server = threading.Thread(
        target=start_server,
        args=(endpoint, cache_dir, args.threads, len(chosen), handles),
        daemon=True,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    while server.is_alive():
        server.join(timeout=1.0)
    print("qwen3-moe-rpc-worker: the RPC server stopped (see the message above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
