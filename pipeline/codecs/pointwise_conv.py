"""The 1x1x1 3-D convolutions of both video VAEs (Turbo ``conv_shortcut``, Wan shortcuts and the latent
``conv1``/``conv2``) as a channel matmul. cuDNN 9.8-9.14 refuses contiguous bf16/fp16 5-D 1x1x1 weights, so
torch 2.8/2.9 wheels run them through the slow native convolution (GPU_REVIEW.md S6); a GEMM over the
channel dim is the same product, on every build and with no 2^31-element limit."""

import torch
import torch.nn.functional as F


def pointwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, Cin, T, H, W], weight [Cout, Cin, 1, 1, 1] -> [B, Cout, T, H, W] (a channels-last view)."""
    return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
