from __future__ import annotations

import torch

from gptflow.model.device import peak_flops, resolve_autocast_dtype, resolve_device


def test_explicit_device_and_dtype_names_are_honoured():
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert resolve_autocast_dtype("auto", cpu) is None  # float32: CPU bf16 is slower on most CPUs
    assert resolve_autocast_dtype("float32", cpu) is None
    assert resolve_autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_autocast_dtype("float32", torch.device("cuda")) is None
    assert resolve_autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert peak_flops(cpu) is None
