"""FP8 linear vs bf16 linear at the MagiHuman DiT's GEMM shapes: time, TFLOP/s and speed-up in one run."""

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fp8.capability import DEQUANTIZE, FP8_MATMUL, dequantize_compute_dtype, supports_fp8_matmul
from ..fp8.linear import Fp8Linear
from ..fp8.quantize import quantize
from .device import describe_device

# (N, K, name) of one expert's weight; the sandwich layers run the same shapes once per modality group.
DIT_SHAPES = (
    (7208, 5120, "linear_qkv"),
    (5120, 5120, "linear_proj"),
    (27304, 5120, "up_gate_proj"),
    (5120, 13652, "down_proj"),
)


@dataclass(frozen=True)
class LinearResult:
    tokens: int
    out_features: int
    in_features: int
    name: str
    method: str
    seconds: float

    @property
    def tflops(self) -> float:
        return 2 * self.tokens * self.out_features * self.in_features / self.seconds / 1e12


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fp8_methods(device: torch.device) -> dict[str, dict]:
    methods = {}
    if supports_fp8_matmul(device):
        methods[FP8_MATMUL] = {"mode": FP8_MATMUL}
        if device.type == "cuda":
            methods[FP8_MATMUL + " fast-accum"] = {"mode": FP8_MATMUL, "fast_accum": True}
    methods[DEQUANTIZE] = {"mode": DEQUANTIZE}
    return methods


def bench_fp8_linear(device: torch.device, tokens: list[int], repeats: int) -> list[LinearResult]:
    """Time bf16 ``F.linear`` and every FP8 path this device has, per shape and token count."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for n, k, name in DIT_SHAPES:
        weight = torch.randn(n, k, generator=generator).mul_(0.02)  # [N, K]
        bf16_weight = weight.to(device, torch.bfloat16)
        fp8 = quantize(weight.to(device))
        del weight
        modules = {
            method: Fp8Linear.from_fp8(fp8, **kwargs) for method, kwargs in _fp8_methods(device).items()
        }
        for m in tokens:
            x = torch.randn(m, k, generator=generator).to(device, torch.bfloat16)  # [M, K]
            seconds = _median_seconds(lambda x=x, w=bf16_weight: F.linear(x, w), device, repeats)
            results.append(LinearResult(m, n, k, name, "bf16", seconds))
            for method, module in modules.items():
                seconds = _median_seconds(lambda x=x, module=module: module(x), device, repeats)
                results.append(LinearResult(m, n, k, name, method, seconds))
            del x
        del modules, fp8, bf16_weight
    return results


def format_linear_results(results: list[LinearResult], device: torch.device) -> str:
    """One row per (shape, M): bf16 then each FP8 path with its speed-up t_bf16 / t_fp8."""
    methods = list(dict.fromkeys(r.method for r in results if r.method != "bf16"))
    lines = [
        f"FP8 linear vs bf16 linear on {describe_device(device)}",
        f"(dequantize path computes in {dequantize_compute_dtype(device)}; median times; "
        "speed-up = t_bf16 / t)",
        "",
        f"{'GEMM':<24}{'M':>7}{'bf16 ms':>10}{'TFLOP/s':>9}"
        + "".join(f"{m + ' ms':>24}{'TFLOP/s':>9}{'speed-up':>9}" for m in methods),
    ]
    rows: dict[tuple, dict[str, LinearResult]] = {}
    for r in results:
        rows.setdefault((r.name, r.out_features, r.in_features, r.tokens), {})[r.method] = r
    for (name, n, k, m), by_method in rows.items():
        base = by_method["bf16"]
        line = f"{f'{name} {n}x{k}':<24}{m:>7}{base.seconds * 1e3:>10.2f}{base.tflops:>9.2f}"
        for method in methods:
            r = by_method[method]
            line += f"{r.seconds * 1e3:>24.2f}{r.tflops:>9.2f}{base.seconds / r.seconds:>8.2f}x"
        lines.append(line)
    return "\n".join(lines)
