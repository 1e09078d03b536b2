"""Which FP8 linear path a device can and should run: the one place that checks hardware for FP8 matmuls.

Paths: ``fp8-matmul`` (``torch._scaled_mm`` on FP8 operands) and ``dequantize`` (weights turned back into a
high-precision matrix for an ordinary matmul). Modes: those two, or ``auto``.
"""

import functools

import torch

FP8_MATMUL = "fp8-matmul"
DEQUANTIZE = "dequantize"
AUTO = "auto"
MODES = (AUTO, FP8_MATMUL, DEQUANTIZE)


@functools.cache
def _cpu_has_scaled_mm() -> bool:
    # torch gained a CPU _scaled_mm in 2.8 (pytorch/pytorch#150410); older builds raise NotImplementedError.
    one = torch.ones((), dtype=torch.float32)
    x = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(x, x.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def supports_fp8_matmul(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` runs on this device: CUDA compute capability ≥ 8.9 (Ada, Hopper,
    Blackwell), or a CPU build of torch that has the CPU kernel. ROCm is excluded: its FP8 GEMMs use the
    *fnuz* types on MI300, not the float8_e4m3fn stored in these checkpoints."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or torch.version.hip is not None:
            return False
        return torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type == "cpu":
        return _cpu_has_scaled_mm()
    return False


@functools.cache
def _rowwise_probe(device: torch.device, fast_accum: bool) -> bool:
    one_a = torch.ones(16, 1, dtype=torch.float32, device=device)
    one_b = torch.ones(1, 16, dtype=torch.float32, device=device)
    x = torch.zeros(16, 16, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            x, x.t(), scale_a=one_a, scale_b=one_b, out_dtype=torch.bfloat16, use_fast_accum=fast_accum
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


def supports_rowwise_scaled_mm(device: torch.device | str, fast_accum: bool = False) -> bool:
    """Whether ``torch._scaled_mm`` takes row-wise scales ([M,1] x [1,N]) on this device, probed once per
    device with a 16x16 call. Many builds lack the kernel although per-tensor scaling works: every Windows
    wheel, sm_89 before about torch 2.7, several sm_100/sm_120 builds (GPU_REVIEW.md C1)."""
    device = torch.device(device)
    if not supports_fp8_matmul(device):
        return False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _rowwise_probe(device, fast_accum)


def choose_path(mode: str, device: torch.device | str) -> str:
    """Resolve a mode into a path for one device, once (at build, load or device move), never per call.

    ``auto`` picks ``fp8-matmul`` only on CUDA GPUs that support it. On CPU, torch's ``_scaled_mm`` emulates
    the FP8 product by upcasting both operands to float32; measured on CPU it is slower than the float32
    dequantize path and also loses accuracy to the activation cast (BENCHMARKS.md), so ``auto`` dequantizes.
    """
    if mode not in MODES:
        raise ValueError(f"FP8 linear mode must be one of {', '.join(MODES)}; got {mode!r}")
    device = torch.device(device)
    if mode == FP8_MATMUL and not supports_fp8_matmul(device):
        raise RuntimeError(
            f"FP8 matmul was requested but {device} cannot run torch._scaled_mm: it needs an NVIDIA GPU "
            "of compute capability 8.9 or newer (RTX 40xx, L4/L40S, H100, RTX 50xx) or a torch build with "
            f"the CPU kernel (torch {torch.__version__} here). Use mode '{DEQUANTIZE}' or '{AUTO}'."
        )
    if mode == AUTO:
        return FP8_MATMUL if device.type == "cuda" and supports_fp8_matmul(device) else DEQUANTIZE
    return mode


def dequantize_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The matmul dtype of the dequantize path: bfloat16 on GPUs; float32 on CPU, where bf16 GEMMs without
    AVX512-BF16/AMX run several times slower than float32 ones (BENCHMARKS.md) and float32 is exact anyway."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
