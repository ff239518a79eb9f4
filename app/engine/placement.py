"""Where the model's tensors go: llama.cpp's ``tensor_buft_overrides``, and its own account.

``--cpu-moe``, ``--n-cpu-moe N`` and ``--override-tensor PATTERN=TYPE`` are llama-server's
flags, with its regexes and its rule order (the first rule whose regex matches a tensor's name,
by ``std::regex_search``, decides its buffer type). They become one NULL-terminated C array of
``llama_model_tensor_buft_override {pattern, buft}``; the buffer types are looked up by name
among the devices of ggml's registry, through libllama's own handle (as ``app.engine.rpc`` does,
so the registry is the one model loading uses, not a second copy of libggml's). The array and
its pattern strings live as long as the ``Placement`` that the backend keeps for the model's
life.

Evidence, not trust: llama.cpp logs each tensor a rule matched ("tensor blk.0.ffn_up_exps.weight
(... ) buffer type overridden to CPU") at debug level. The load is run with that log captured
(and passed on to llama-cpp-python's own handler, which prints what its level lets through),
so the backend knows, from llama.cpp itself, which tensors went where, logs a summary, and warns
when rules were given and llama.cpp matched none of them.

llama-cpp-python's ``Llama`` builds its own model parameters and has no way to pass these, so a
model with overrides is loaded by the batching engine (``app.engine.load_backend``).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

logger = logging.getLogger(__name__)

MOE_EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
"""llama.cpp's ``LLM_FFN_EXPS_REGEX`` (common/common.h): a layer's MoE expert tensors."""
CPU_BUFFER_TYPE = "CPU"

OverrideRule = tuple[str, str]
"""(regex over tensor names, buffer type name)."""

_OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


def override_rules(
    *, override_tensor: Sequence[str] = (), cpu_moe: bool = False, n_cpu_moe: int = 0
) -> tuple[OverrideRule, ...]:
    """The rules in the order llama.cpp tries them: ``--override-tensor``'s, then the MoE ones
    (llama-server's ``--cpu-moe`` rule, or one ``blk\\.{i}`` rule per layer for
    ``--n-cpu-moe``)."""
    rules = [tuple(rule.rsplit("=", 1)) for rule in override_tensor]
    if cpu_moe:
        rules.append((MOE_EXPERTS_REGEX, CPU_BUFFER_TYPE))
    else:
        rules += [(rf"blk\.{i}{MOE_EXPERTS_REGEX}", CPU_BUFFER_TYPE) for i in range(n_cpu_moe)]
    return tuple((pattern, buffer_type) for pattern, buffer_type in rules)


def _ggml() -> Any:
    lib = llama_cpp.llama_cpp._lib
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    return lib


def buffer_types() -> dict[str, int]:
    """Each device's buffer type by name (``CPU``, ``CUDA0``, ``RPC[host:port]``, ...), as
    llama-server lists them for ``-ot``."""
    llama_cpp.llama_backend_init()
    ggml = _ggml()
    found: dict[str, int] = {}
    for i in range(ggml.ggml_backend_dev_count()):
        buft = ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_get(i))
        if buft:
            found[ggml.ggml_backend_buft_name(buft).decode()] = int(buft)
    return found


def check_buffer_types(rules: Sequence[OverrideRule]) -> dict[str, int]:
    """The buffer types the rules name, or a ValueError naming the rule and what exists."""
    if not rules:
        return {}
    available = buffer_types()
    for pattern, buffer_type in rules:
        if buffer_type not in available:
            flag = (
                "--cpu-moe / --n-cpu-moe"
                if MOE_EXPERTS_REGEX in pattern
                else (f"--override-tensor {pattern}={buffer_type}")
            )
            raise ValueError(
                f"{flag}: this llama.cpp build has no buffer type {buffer_type!r}; it has "
                + ", ".join(sorted(available))
            )
    return available


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass(eq=False)
class Placement:
    """The override array handed to llama.cpp (kept alive here), then what llama.cpp did."""

    rules: tuple[OverrideRule, ...]
    overridden: dict[str, str] = field(default_factory=dict)
    """Tensor name -> buffer type, for every tensor llama.cpp reported overriding."""
    _patterns: list[bytes] = field(default_factory=list, repr=False)
    _array: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rules:
            return
        if len(self.rules) > llama_cpp.llama_max_tensor_buft_overrides():
            raise ValueError(
                f"{len(self.rules)} tensor overrides are more than llama.cpp takes "
                f"({llama_cpp.llama_max_tensor_buft_overrides()})"
            )
        types = check_buffer_types(self.rules)
        self._patterns = [pattern.encode() for pattern, _ in self.rules]
        self._array = (_Override * (len(self.rules) + 1))()  # zeroed: the NULL terminator
        for slot, pattern, (_, buffer_type) in zip(
            self._array, self._patterns, self.rules, strict=False
        ):
            slot.pattern = pattern
            slot.buft = types[buffer_type]

    def apply(self, params: Any) -> Any:
        """``params`` (``llama_model_params``) with the override array set, if any."""
        if self._array is not None:
            params.tensor_buft_overrides = ctypes.addressof(self._array)
        return params

    def record(self, log: Sequence[str]) -> None:
        """Read llama.cpp's load log for the tensors it overrode; say what happened."""
        for line in log:
            match = _OVERRIDDEN.search(line)
            if match:
                self.overridden[match.group(1)] = match.group(2)
        if not self.rules:
            return
        if not self.overridden:
            logger.warning(
                "llama.cpp reported no tensor matched the tensor overrides %s",
                [f"{p}={t}" for p, t in self.rules],
            )
            return
        by_type = Counter(self.overridden.values())
        logger.info(
            "tensor overrides: %s",
            ", ".join(f"{n} tensors to {t}" for t, n in sorted(by_type.items())),
        )


_capture_lock = threading.Lock()


@contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """llama.cpp's log lines (every level) while the block runs, also passed on to
    llama-cpp-python's handler. The log callback is process-wide, so captures are serialised."""
    from llama_cpp import _logger

    lines: list[str] = []
    forward = _logger.llama_log_callback

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))
        forward(level, text, user_data)

    with _capture_lock:
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
