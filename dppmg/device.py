"""Config device and precision names → torch devices and autocast blocks, in one place."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a config value: "auto" is cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sampling_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """The precision, fp32 or bf16, that image sampling runs at for a config value. "auto" is bf16 on a CPU
    with AMX tiles (Intel Sapphire Rapids and later, where oneDNN runs bfloat16 convolutions and matmuls on them:
    2x a tiny-UNet call, benchmarks/bench_precision.py), and fp32 everywhere else, including GPUs, whose pipelines
    choose their own dtype when they load."""
    if precision != "auto":
        return precision
    if torch.device(device).type != "cpu":
        return "fp32"
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: guarded
    return "bf16" if has_amx is not None and has_amx() else "fp32"


def sampling_autocast(
    precision: str, device: str | torch.device = "cpu"
) -> contextlib.AbstractContextManager:
    """The autocast block that sampling at `precision` runs in (bf16: matmuls and convolutions in bfloat16, the
    sampler's own arithmetic in float32); a no-op for fp32."""
    if sampling_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
