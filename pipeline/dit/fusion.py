"""Optional ``torch.compile`` of the DiT's small elementwise functions: the RMSNorms (with the bf16 cast of
the GEMM inputs), q/k norm + RoPE, the attention gate, gelu7/swiglu7 and the FP8 activation scaling.

Why: unfused, these fp32 chains move more bytes than the FP8 GEMMs compute at 256p (GPU_REVIEW.md S1, S2).
Each becomes one or two kernels. Only pure functions are compiled (``dynamic=True``, so prompt lengths and
expert splits do not recompile); never the whole model, whose Python loops and block-swap streams do not
compile well. Chosen once per model, like the FP8 module swap: :func:`fuse` replaces the function
attributes of its modules. ``auto`` compiles where Triton works (CUDA GPUs of compute capability >= 7.0 with
the triton package: not on most Windows installs) and stays eager elsewhere; FP8 casts are compiled only on
sm_89 and newer (Triton has no e4m3 below). A function whose compilation fails runs eager from then on.
"""

import functools
import importlib.util
import logging
import shutil

import torch

from ...fp8.capability import FP8_MATMUL, choose_path
from ...fp8.linear import Fp8Linear, scale_to_fp8_fusible
from .model import MLP, Attention, ModalityRMSNorm

log = logging.getLogger(__name__)

AUTO, ON, OFF = "auto", "on", "off"
MODES = (AUTO, ON, OFF)


def compile_available(device: torch.device | str) -> bool:
    """Whether torch.compile can generate kernels here: Triton on CUDA (compute capability >= 7.0), a C++
    compiler on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None or torch.version.hip is not None:
            return False
        return torch.cuda.get_device_capability(device) >= (7, 0)
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))
    return False


def fp8_casts_compile(device: torch.device | str) -> bool:
    """FP8 casts go into compiled kernels only on sm_89+ GPUs (Triton "fp8e4nv not supported" below) and on
    CPU, whose C++ backend converts in software."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


class Fused:
    """``torch.compile(fn, dynamic=True)`` that falls back to ``fn`` for good, with one warning, if
    compiling or running the compiled code fails (out-of-memory errors are not a compiler problem and
    propagate)."""

    def __init__(self, fn):
        self.eager, self.compiled, self.failed = fn, torch.compile(fn, dynamic=True), False
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 (any compiler failure: run the same maths eagerly)
                self.failed = True
                log.warning("torch.compile of %s failed (%s); it runs eager", self.__name__, e)
        return self.eager(*args)


@functools.cache
def fused(fn) -> Fused:
    """One compiled twin per function, shared by every module (and model) of the process."""
    return Fused(fn)


def should_fuse(mode: str, device: torch.device | str) -> bool:
    """Resolve a mode for a compute device: ``auto`` (compile where Triton works), ``on`` or ``off``."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}; got {mode!r}")
    device = torch.device(device)
    if mode == ON and not compile_available(device):
        raise RuntimeError(
            f"torch.compile was requested but cannot generate kernels on {device}: it needs the triton "
            "package and a CUDA GPU of compute capability 7.0+ (or a C++ compiler for CPU). Use 'auto' or "
            "'off'."
        )
    return mode == ON or (mode == AUTO and device.type == "cuda" and compile_available(device))


def fuse(model: torch.nn.Module, mode: str, device: torch.device | str) -> list[str]:
    """Swap the elementwise functions of ``model``'s modules for compiled twins when ``mode`` resolves to
    compiling on ``device`` (the compute device); returns the names of the functions swapped."""
    if not should_fuse(mode, device):
        return []
    casts = fp8_casts_compile(device)
    names = set()
    for module in model.modules():
        swaps = {}
        if isinstance(module, ModalityRMSNorm):
            swaps = {"kernel": module.kernel}
        elif isinstance(module, Attention):
            swaps = {"norm_rope": module.norm_rope, "gate": module.gate}
        elif isinstance(module, MLP):
            swaps = {"activation": module.activation}
        elif isinstance(module, Fp8Linear) and casts and choose_path(module.mode, device) == FP8_MATMUL:
            # by the compute device's path: a model loaded to the offload device resolves it when moved
            swaps = {"scale_input": scale_to_fp8_fusible}
        for attribute, fn in swaps.items():
            fn = getattr(fn, "eager", fn)  # already fused: keep one twin
            setattr(module, attribute, fused(fn))
            names.add(fn.__name__)
    log.info("compiled elementwise functions on %s: %s", device, ", ".join(sorted(names)))
    return sorted(names)
