"""Mixed precision on the CPU: when a loop trains in bf16 there, and what its steps run under."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def cpu_bf16(config, accelerator) -> bool:
    """Whether a loop trains in bf16 autocast on the CPU (AMX-BF16 units, where the CPU has them)."""
    return config.mixed_precision == "bf16" and accelerator.device.type == "cpu"


def cpu_has_bf16_units() -> bool:
    """Whether oneDNN finds bf16 instructions on this CPU (AVX512-BF16 or AMX); without them bf16 matmuls are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume the user knows the machine
        return True


def step_context(config, accelerator) -> contextlib.AbstractContextManager:
    """What a loop's steps run under: on CPU with bf16, the math attention backend, else nothing.

    PyTorch's CPU flash-attention backward runs about 6x slower in bf16 than the math backend,
    which makes plain bf16 autocast slower than fp32 on CPU (0.72-0.90x, benchmarks/RESULTS.md).
    """
    if cpu_bf16(config, accelerator):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
