"""Training and evaluation on one CPU kernel set, so that a seed means one model on any x86-64 machine.

`authopt train` is deterministic for a seed on a given machine (seeded split, initialisation and
shuffling; one torch thread; deterministic algorithms). Across machines it was not: torch picks its
CPU kernels by the instructions the CPU has (AVX2, AVX-512), their sums round differently in the
last bits, and twelve epochs of training plus a closed-loop on-policy round turn that into another
model (measured 2026-12-04: the same seed with AVX-512 and with AVX2 kernels gave first fits whose
weights differ by up to 0.26 and different on-policy logs). The bundled model of 2026-11-25 was
trained on a machine of another kind and no later machine reproduced it.

So both commands pin the kernel set before torch loads: ATen's dispatch to AVX2, MKL's
conditional numerical reproducibility mode to AVX2, oneDNN's ISA to AVX2 — the widest set every
x86-64 server of the last decade has. A variable already set in the environment wins (to train
with the machine's native kernels, set ``ATEN_CPU_CAPABILITY`` to its value). Other CPU
architectures run natively. What was used is recorded in the manifest (`numerics`).
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["PINNED_ENV", "numerics", "pin_numerics"]

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_numerics() -> bool:
    """Pin torch's CPU kernels (x86-64 only) unless set already; False when torch is loaded too early."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    if "torch" in sys.modules:
        return os.environ.get("ATEN_CPU_CAPABILITY") is not None
    for key, value in PINNED_ENV.items():
        os.environ.setdefault(key, value)
    return True


def numerics() -> dict[str, str]:
    """The torch build and CPU kernel set in use (for the manifest)."""
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        **{k.lower(): os.environ[k] for k in PINNED_ENV if k in os.environ},
    }
