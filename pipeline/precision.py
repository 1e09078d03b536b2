"""Which floating-point type the convolutional models (VAEs) compute in on a given device."""

import torch


def vae_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs (the official precision); float32 on CPU, where bf16 convolutions without AVX512-BF16/AMX
    run 50-100x slower than float32 (measured on the demo's VAEs: 332 s vs 3.5 s for the Turbo decode)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
