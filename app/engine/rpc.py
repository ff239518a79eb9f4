"""llama.cpp RPC: model layers on other machines.

llama-cpp-python 0.3.36 has no ``rpc_servers`` argument any more: llama.cpp turned RPC servers
from a model parameter into ggml backend devices. Like llama.cpp's own ``--rpc`` flag, we
register each server once per process; every model loaded afterwards with ``n_gpu_layers``
offloads to the RPC devices first. The RPC entry point is looked up through ggml's registry by
name, which works whether the RPC backend is linked in or loaded as a module.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from collections.abc import Sequence

import llama_cpp

logger = logging.getLogger(__name__)

_RPC_CONNECT_TIMEOUT_S = 5.0
_RpcAddServer = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def register_rpc_servers(endpoints: Sequence[str]) -> None:
    """Make each ``host:port`` llama.cpp RPC server a device for the models loaded after this.

    ggml aborts the whole process when it cannot connect to a server, so each one is first
    reached with a plain TCP connection and an unreachable one is an exception here instead.
    Registering a server twice is a no-op.
    """
    if not endpoints:
        return
    if not llama_cpp.llama_supports_rpc():
        raise RuntimeError("rpc_servers needs llama-cpp-python built with -DGGML_RPC=on")
    # ggml's registry through libllama's own handle: symbols looked up there resolve in the
    # libggml that libllama uses. (The wheel holds libggml.so and libggml.so.0 as two files, so
    # opening libggml by path, as llama_cpp._ggml does, loads a second copy with an empty
    # registry that model loading never sees.)
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_count.argtypes = []
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None

    rpc = ggml.ggml_backend_reg_by_name(b"RPC")
    address = ggml.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    if not address:
        raise RuntimeError("this llama.cpp build has no ggml_backend_rpc_add_server")
    add_server = _RpcAddServer(address)
    registered = {ggml.ggml_backend_reg_get(i) for i in range(ggml.ggml_backend_reg_count())}
    for endpoint in endpoints:
        host, _, port = endpoint.partition(":")
        try:
            socket.create_connection((host, int(port)), timeout=_RPC_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"RPC server {endpoint} is not reachable: {exc}") from exc
        server = add_server(endpoint.encode())
        if not server:
            raise RuntimeError(f"RPC server {endpoint} offers no devices")
        if server not in registered:
            ggml.ggml_backend_register(server)
            registered.add(server)
        logger.info("RPC server %s registered: model layers can go to its devices", endpoint)
