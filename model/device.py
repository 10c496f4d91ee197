"""Where and in which precision the model runs."""

from __future__ import annotations

import contextlib

import torch

# Dense bf16 tensor-core peaks from the vendor data sheets, matched against
# torch.cuda.get_device_name() in order (so "H100 PCIe" is tried before "H100").
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; anything else is a torch device string."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``TrainConfig.dtype`` value; None means plain float32.

    ``auto`` is bf16 on CUDA only: CPU autocast to bf16 is slower than float32 on most CPUs, and
    bf16 has the range of float32, so it needs no loss scaling.
    """
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a run computes, as it is tagged: ``bfloat16`` (autocast) or ``float32``."""
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known CUDA device, the denominator of MFU; None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for marker, flops in PEAK_BF16_FLOPS if marker in name), None)
