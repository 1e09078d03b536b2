"""How much device memory a DiT stage needs, and how many layers to swap for a card: the arithmetic shared by
the ComfyUI nodes and the command line, fitted to ``python cli.py bench memory`` (BENCHMARKS.md)."""

from collections.abc import Sequence
from pathlib import Path

import torch

from .loading import weight_bytes

# Peak activations of one full-size DiT forward, base + per token, an upper line through `python cli.py bench
# memory` (BENCHMARKS.md): predicted 0.99 GiB at 3,910 tokens (256p), 1.87 at 14,662 (540p SR), 5.33 at
# 65,606 (1080p SR); this gives 1.11, 1.96 and 5.99 GiB.
ACTIVATION_BASE_BYTES = int(0.8 * 2**30)
BYTES_PER_TOKEN = 85_000
# Device memory outside torch's allocator that the predictions leave out: the CUDA context, cuBLAS and
# cuDNN workspaces (0.5-0.8 GB); counted when swap layers are chosen, so that "auto" is not tight.
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)
# What the command line keeps free on the card besides that: ComfyUI's default reserve (0.8 GiB + 0.4 GiB).
INFERENCE_RESERVE_BYTES = int(0.8 * 2**30) + 400 * 2**20


def held_by_others(device: torch.device | str) -> int:
    """Bytes of a CUDA device in use outside this process's allocator and its CUDA context (the display, a
    browser, another program), now: the "auto" choices count the card as that much smaller. This process's
    own cached memory is not counted: ComfyUI frees it (unloading models) when a run needs room. 0 on other
    devices (no such query)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device) - CUDA_CONTEXT_BYTES)


def dit_tokens(latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Tokens of one DiT forward: video patches (2x2 latent cells), audio latents (4 per latent frame after
    the first) and the 640 text tokens."""
    return latent_frames * latent_height * latent_width // 4 + 4 * (latent_frames - 1) + 1 + 640


def dit_activations(tokens: int, batched: bool) -> int:
    """Activation bytes of a DiT forward of ``tokens`` tokens (twice with conditional and unconditional
    batched)."""
    return (ACTIVATION_BASE_BYTES + tokens * BYTES_PER_TOKEN) * (2 if batched else 1)


def auto_swap_layers(model: int, layers: Sequence[int], available: int, activations: int) -> int:
    """The fewest of the last layers to keep in system memory so that the model's ``model`` bytes less the
    swapped layers' (``layers``: bytes of each transformer layer), plus two swapped layers in flight (the one
    computing, the one prefetched), ``activations`` and the CUDA context fit in ``available`` bytes. Every
    layer when even that does not fit."""
    for count in range(len(layers) + 1):
        swapped = sorted(layers[len(layers) - count :])
        if model - sum(swapped) + sum(swapped[-2:]) + activations + CUDA_CONTEXT_BYTES <= available:
            return count
    return len(layers)


def swap_layers_for(path: str | Path, variant: str | None, compute: str, tokens: int, available: int) -> int:
    """:func:`auto_swap_layers` for the DiT checkpoint at ``path`` (sizes from its headers, before loading)
    running forwards of ``tokens`` tokens one at a time (CFG branches in turn) in ``available`` bytes."""
    model, layers = weight_bytes(path, variant, compute)
    return auto_swap_layers(model, layers, available, dit_activations(tokens, batched=False))
