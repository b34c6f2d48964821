"""What the CPU this runs on can do: its model and the matrix-unit instructions engines are built for
(recorded with every build and every benchmark: ratios against PyTorch move with the CPU)."""

from __future__ import annotations

import functools
import os
import platform

# The instructions a CPU engine's speed (and a bf16 or int8 engine's very ability to run) depends on.
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu() -> dict:
    """{"model", "flags" (the MATRIX_FLAGS it has), "cores"}, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in MATRIX_FLAGS if f in flags], "cores": os.cpu_count()}


def has_bf16() -> bool:
    """bf16 matrix instructions: AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake) or AMX (Sapphire Rapids on)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu()["flags"]))
