"""Keep freed memory in the process: glibc malloc settings that stop the page-fault churn of CPU training.

A CPU training step allocates and frees the same multi-MB buffers every step (gradients, which the Trainer frees with
`zero_grad(set_to_none=True)`, activations, logits, the experts' per-pair buffers). glibc serves every allocation above
its mmap threshold (128 KiB, raised on its own only up to 32 MiB) with a fresh `mmap` and hands it back with `munmap`
on free, and trims the top of its heap whenever more than the trim threshold is free there: the next step faults every
page in again. Measured on the tiny preset (2-core CPU): about 14,500 minor page faults per step at E=8, a million
(4 GB of zeroed pages) per step at E=128, where the step became about 1.8x faster once the memory was kept.

`keep_freed_memory()` sets, through `mallopt` (process-wide, effective for every allocation made afterwards):

- `M_MMAP_MAX = 0`: no allocation is served by `mmap`; freed blocks stay in the heap and are reused,
- `M_TRIM_THRESHOLD = -1`: the heap is never trimmed (handed back to the OS),
- `M_TOP_PAD = 64 MiB`: the heap grows in larger steps (fewer `brk` calls while it reaches its working size).

The cost is memory: what a step freed stays resident, and reuse is not perfect (a freed block that is slightly smaller
than the next request is skipped), so the peak resident memory is higher (about +25% on the E=128 tiny model) and
creeps up over the first steps before it settles. `remoe train` calls it at start-up; in your own script call it once,
as early as possible (before the model is built):

    from remoe.training.allocator import keep_freed_memory

    keep_freed_memory()  # {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1, "M_TOP_PAD": 67108864}, or {} where skipped

It does nothing (and logs why, at INFO level on the `remoe.training.allocator` logger) where the settings would not
apply or would not be wanted: off Linux/glibc (macOS, Windows, musl), under another allocator (jemalloc, tcmalloc or
mimalloc loaded with `LD_PRELOAD`), when the environment already sets glibc's malloc parameters (`MALLOC_*_` variables
or `glibc.malloc.*` in `GLIBC_TUNABLES`: yours win), or when `REMOE_KEEP_FREED_MEMORY=0` is set (the switch that turns
it off for `remoe train` and for every script that calls it). The same settings without code, for any process:
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615:glibc.malloc.top_pad=67108864`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

DISABLE_VARIABLE = "REMOE_KEEP_FREED_MEMORY"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8

TOP_PAD_BYTES = 64 << 20
SETTINGS = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
    "M_TOP_PAD": (M_TOP_PAD, TOP_PAD_BYTES),
}

# The environment variables through which glibc reads the same parameters at start-up (the user's choice wins).
GLIBC_MALLOC_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_ARENA_MAX",
)

_applied: dict[str, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):  # musl and others have no such confstr name
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _malloc_is_glibc(libc: ctypes.CDLL) -> bool:
    """Whether `malloc` as the process resolves it is glibc's (not an allocator preloaded in front of it)."""
    process = ctypes.CDLL(None)
    return ctypes.cast(process.malloc, ctypes.c_void_p).value == ctypes.cast(libc.malloc, ctypes.c_void_p).value


def _mallopt(libc: ctypes.CDLL, parameter: int, value: int) -> bool:
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return libc.mallopt(parameter, value) == 1


def _skip_reason() -> str | None:
    if os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]}"
    preset = [name for name in GLIBC_MALLOC_VARIABLES if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        preset.append("GLIBC_TUNABLES")
    if preset:
        return f"the environment sets glibc's malloc parameters ({', '.join(preset)})"
    return None


def keep_freed_memory() -> dict[str, int]:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (see the module docstring).

    Returns the parameters set (name -> value), or `{}` where nothing was set; the reason is logged at INFO level.
    Calling it again returns what the first call applied."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    reason = _skip_reason()
    libc = None
    if reason is None:
        libc = _glibc()
        if libc is None:
            reason = f"not glibc ({sys.platform})"
        elif not _malloc_is_glibc(libc):
            reason = "malloc is not glibc's (an allocator is preloaded)"
    if reason is not None:
        logger.info("remoe: malloc settings left as they are: %s", reason)
        return {}
    applied = {}
    for name, (parameter, value) in SETTINGS.items():
        if _mallopt(libc, parameter, value):
            applied[name] = value
        else:
            logger.info("remoe: mallopt(%s, %d) was refused", name, value)
    logger.info("remoe: glibc keeps freed memory for reuse (%s)", ", ".join(f"{k}={v}" for k, v in applied.items()))
    _applied = applied
    return dict(applied)


__all__ = ["DISABLE_VARIABLE", "keep_freed_memory"]
