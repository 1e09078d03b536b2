"""DiT forward step time and peak memory, FP8 vs bf16 block linears, at the token counts of 5-second clips.

Weights are random (generated on the target device, no download): speed does not depend on their values.
On a GPU the real 15.3B architecture runs; on CPU a reduced-width model (same depth pattern) is used.
"""

import dataclasses
import functools
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..fp8.linear import Fp8Linear
from ..fp8.quantize import quantize
from ..pipeline.dit.config import PRESETS, DiTConfig, swiglu7_width
from ..pipeline.dit.linear import Bf16Linear
from ..pipeline.dit.model import MagiDiT
from ..pipeline.dit.rope import default_bands
from ..pipeline.sampling.sizes import BASE_SIZE, SR_TARGETS
from .device import describe_device, peak_gib

SECONDS = 5
TEXT_TOKENS = 200
# (name, width, height, DiT preset): the base stage at 256p and the two super-resolution targets.
CLIPS = (("256p", *BASE_SIZE, "distill"), ("540p", *SR_TARGETS["540p"], "sr_540p"),
         ("1080p", *SR_TARGETS["1080p"], "sr_1080p"))  # fmt: skip


def reduced(config: DiTConfig) -> DiTConfig:
    """The CPU stand-in: hidden 1024 (8 heads of 128, 2 KV heads), 8 layers with sandwich layers at both
    ends; same head_dim, gating, activations and attention pattern as the real model."""
    return dataclasses.replace(
        config,
        num_layers=8,
        hidden_size=1024,
        num_heads_q=8,
        num_heads_kv=2,
        mm_layers=(0, 1, 6, 7),
        gelu7_layers=(0, 1),
        gelu7_intermediate=4 * 1024,
        swiglu7_intermediate=swiglu7_width(1024),
        local_attn_layers=tuple(i for i in range(8) if i != 3) if config.local_attn_layers else (),
    )


def clip_inputs(width: int, height: int, device: torch.device, scale: float = 1.0):
    """Random latents of a SECONDS-long clip: video [1,48,F,h,w], audio [1,A,64], text [1,L,3584]; ``scale``
    shrinks the frame count (CPU runs)."""
    frames = max(2, round((25 * SECONDS // 4 + 1) * scale))
    audio = max(2, round((25 * SECONDS + 1) * scale))
    video = torch.randn(1, 48, frames, height // 16, width // 16, device=device)
    return video, torch.randn(1, audio, 64, device=device), torch.randn(1, TEXT_TOKENS, 3584, device=device)


LAYER = re.compile(r"block\.layers\.\d+\.")


def _random_entry(key: str, placeholder: torch.Tensor, head_dim: int, device, generator) -> dict:
    if key.endswith("weight_scale"):
        return {}  # made with its weight
    if key.endswith("rope.bands"):
        return {key: default_bands(head_dim).to(device)}
    if "norm" in key:
        return {key: torch.zeros(placeholder.shape, device=device)}  # weight (1 + 0): plain RMSNorm
    if placeholder.dtype == torch.float8_e4m3fn:
        weight = torch.randn(placeholder.shape, generator=generator, device=device, dtype=torch.bfloat16)
        return quantize(weight.mul_(0.02)).state_dict(key.removesuffix("weight"))
    value = torch.randn(placeholder.shape, generator=generator, device=device, dtype=placeholder.dtype)
    return {key: value.mul_(0.02)}


def randomize(module: nn.Module, head_dim: int, device: torch.device, seed: int = 0, offload=()) -> nn.Module:
    """Load random N(0, 0.02) weights, made on ``device``, into a meta-built DiT (or one layer), one layer
    at a time, so the build never holds more than one layer's unpadded copies. Keys starting with a prefix
    in ``offload`` move to the CPU right after they are made (block swap); the values do not depend on it."""
    generator = torch.Generator(device).manual_seed(seed)
    placeholders = module.state_dict(keep_vars=True)
    groups: list[tuple[str | None, list[str]]] = []  # consecutive runs of one layer's keys, in order
    for key in placeholders:
        match = LAYER.match(key)
        name = match.group(0) if match else None
        if not groups or groups[-1][0] != name:
            groups.append((name, []))
        groups[-1][1].append(key)
    for name, keys in groups:
        state = {}
        for key in keys:
            state.update(_random_entry(key, placeholders[key], head_dim, device, generator))
        if name is not None and name.startswith(tuple(offload)):
            state = {k: v.to("cpu") for k, v in state.items()}
        module.load_state_dict(state, strict=False, assign=True)
        del state
    left = [k for k, t in module.state_dict().items() if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"random weights missing for {left[:3]}")
    return module.eval()


def random_dit(
    config: DiTConfig, linear: str, device: torch.device, seed: int = 0, offload_layers: int = 0
) -> MagiDiT:
    """A DiT with random N(0, 0.02) weights made directly on ``device``; ``linear`` is "fp8" or "bf16". The
    last ``offload_layers`` layers end up in CPU memory (for :class:`BlockSwap`), with the same values."""
    linear_cls = functools.partial(Fp8Linear, mode="auto") if linear == "fp8" else Bf16Linear
    model = MagiDiT(config, linear_cls=linear_cls, device="meta")
    first = config.num_layers - offload_layers
    offload = [f"block.layers.{i}." for i in range(first, config.num_layers)]
    return randomize(model, config.head_dim, device, seed, offload)


@dataclass(frozen=True)
class ForwardResult:
    clip: str
    linear: str
    tokens: int
    seconds: float
    resident_gib: float  # weights on the device after loading
    peak_gib: float  # during the forward (GPU: allocator peak; CPU: process max RSS)


def bench_dit_forward(device: torch.device, clips: list[str], repeats: int) -> list[ForwardResult]:
    on_gpu = device.type == "cuda"
    results = []
    for linear in ("fp8", "bf16"):
        for name, width, height, preset in (c for c in CLIPS if c[0] in clips):
            config = PRESETS[preset] if on_gpu else reduced(PRESETS[preset])
            if on_gpu:
                torch.cuda.empty_cache()
            model = random_dit(config, linear, device)
            if on_gpu:  # after the build: the peak column is the forward's, not the weights' creation
                torch.cuda.reset_peak_memory_stats(device)
            resident = sum(t.nbytes for t in model.state_dict().values()) / 2**30
            sample = clip_inputs(width, height, device, scale=1.0 if on_gpu else 0.125)
            times = []
            with torch.inference_mode():
                model(*sample)  # warm-up: kernels, allocator
                for _ in range(repeats):
                    if on_gpu:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    model(*sample)
                    if on_gpu:
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - start)
            tokens = sample[0].shape[2] * sample[0].shape[3] * sample[0].shape[4] // 4
            tokens += sample[1].shape[1] + TEXT_TOKENS
            results.append(
                ForwardResult(name, linear, tokens, statistics.median(times), resident, peak_gib(device))
            )
            del model, sample
    return results


def format_forward_results(results: list[ForwardResult], device: torch.device) -> str:
    full = device.type == "cuda"
    lines = [
        f"DiT forward on {describe_device(device)}",
        "full 15.3B model"
        if full
        else "reduced-width CPU stand-in (hidden 1024, 8 layers, 1/8 of the frames)",
        "",
        f"{'clip':<7}{'tokens':>8}{'fp8 s':>9}{'bf16 s':>9}{'speed-up':>10}"
        f"{'fp8 weights GiB':>17}{'bf16 weights GiB':>18}{'fp8 peak GiB':>14}{'bf16 peak GiB':>15}",
    ]
    by_clip: dict[str, dict[str, ForwardResult]] = {}
    for r in results:
        by_clip.setdefault(r.clip, {})[r.linear] = r
    for clip, pair in by_clip.items():
        fp8, bf16 = pair["fp8"], pair["bf16"]
        speedup = bf16.seconds / fp8.seconds
        lines.append(
            f"{clip:<7}{fp8.tokens:>8}{fp8.seconds:>9.3f}{bf16.seconds:>9.3f}{speedup:>9.2f}x"
            f"{fp8.resident_gib:>17.2f}{bf16.resident_gib:>18.2f}{fp8.peak_gib:>14.2f}{bf16.peak_gib:>15.2f}"
        )
    return "\n".join(lines)
