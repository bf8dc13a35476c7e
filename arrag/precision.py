"""Numerical precision of training and generation (`precision: auto | fp32 | bf16`) and the machine it ran on.

`auto` resolves to bf16 only where the hardware computes bf16 natively, else fp32:
- CUDA: bf16 when `torch.cuda.is_bf16_supported()`;
- CPU: bf16 when the CPU has AVX512-BF16 or AMX-BF16 instructions (torch's cpuinfo) *and* neither torch's own
  kernels (`ATEN_CPU_CAPABILITY`, read back through `torch.backends.cpu.get_cpu_capability()`) nor oneDNN's
  (`ONEDNN_MAX_CPU_ISA` / `DNNL_MAX_CPU_ISA`) are capped below them. Elsewhere torch emulates bf16: on an AVX2-only
  CPU (AMD EPYC Zen 3) the Shapes VQ's forward + backward took 15x longer in bf16 autocast than in fp32.
The rule reads the hardware and the environment only (no timing), so `auto` resolves the same way on every run
of one machine. The resolved value is what training configs, checkpoints, metrics.json and result records hold.
"""

from __future__ import annotations

import contextlib
import os

import torch

from evaluators.record import cpu_model

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow its native bf16 kernels.
ONEDNN_BF16_ISAS = {"avx512_core_bf16", "avx512_core_fp16", "avx10_1_512", "avx512_core_amx", "avx10_1_512_amx",
                    "avx512_core_amx_fp16", "avx10_1_512_amx_fp16", "all", "default"}


def cpu_has_native_bf16() -> bool:
    """True when bf16 matrix products run on native instructions here (see the module docstring)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")):
        return False
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap is None or cap.strip().lower() in ONEDNN_BF16_ISAS


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """`auto` | `fp32` | `bf16` -> `fp32` | `bf16` for `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def precision_of(model: torch.nn.Module) -> str:
    """`bf16` or `fp32` (else the dtype's name) from the dtype of a model's first floating parameter."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return {dtype: name for name, dtype in DTYPES.items()}.get(dtype, str(dtype))


def autocast(precision: str, device: str | torch.device = "cpu"):
    """bf16 autocast on `device` when the (resolved) precision is bf16, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def machine(device: str | torch.device = "cpu") -> dict:
    """What a number depends on besides code and settings: CPU model and kernel level, threads, GPU."""
    info = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
