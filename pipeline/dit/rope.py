"""RoPE: the element-wise Fourier embedding of the 9-column token coordinates, and the partial rotate-half
rotation of q/k (the first 3/4 of each head's dims; t, h, w get head_dim/8 frequency bands each)."""

import torch
from torch import nn


def default_bands(head_dim: int) -> torch.Tensor:
    """The inverse frequencies 10000^(-j/B), j < B = head_dim/8, computed as the official code does (the
    checkpoints store the same values as ``adapter.rope.bands``)."""
    num = head_dim // 8
    exponent = torch.arange(num, dtype=torch.int64).to(torch.float32) / num
    return 1.0 / (10000.0**exponent)


def fourier_embed(coords: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """coords [S, 9] (t, h, w, T, H, W, refT, refH, refW) -> [S, 6B] fp32 = [sin(t,h,w x B) | cos(t,h,w x B)].

    angle = (coord - centre) · (ref-1)/(size-1) · band, centre = (size-1)/2 on h and w, 0 on t; an axis with
    ref = size = 1 has scale 1. The operation order follows the official code so results are bit-identical.
    """
    position, sizes, refs = coords[:, :3], coords[:, 3:6], coords[:, 6:9]
    scales = torch.where((refs == 1) & (sizes == 1), 1.0, (refs - 1) / (sizes - 1))  # [S, 3]
    centres = (sizes - 1) / 2
    centres[:, 0] = 0
    angles = (position - centres).unsqueeze(-1) * scales.unsqueeze(-1) * bands  # [S, 3, B]
    return torch.cat([angles.sin(), angles.cos()], dim=1).flatten(1)


class FourierEmbed(nn.Module):
    """Holds the checkpoint buffer ``bands`` [head_dim/8]; a placeholder until the state dict is loaded."""

    def __init__(self, head_dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("bands", torch.empty(head_dim // 8, dtype=torch.float32, device=device))

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords [S, 9] -> (sin, cos), each [S, 3B]."""
        sin, cos = fourier_embed(coords, self.bands).chunk(2, dim=-1)
        return sin, cos


def apply_rope(
    x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Rotate x [S, H, Dh] (fp32) by sin/cos [S, n] (n = 3B): dim j pairs with dim j+n for j < n (NeoX
    rotate-half, non-interleaved); dims >= 2n pass through. Math in fp32, result written as ``out_dtype``
    (the attention input dtype) without an fp32 copy of the whole tensor."""
    n = sin.shape[-1]
    sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)  # [S, 1, n]: shared by all heads
    x1, x2 = x[..., :n], x[..., n : 2 * n]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # [S, H, Dh]
    # x1·cos - x2·sin equals the official x1·cos + (-x2)·sin bit for bit (negation is exact).
    out[..., :n] = x1 * cos - x2 * sin
    out[..., n : 2 * n] = x2 * cos + x1 * sin
    out[..., 2 * n :] = x[..., 2 * n :]
    return out
