"""The plain bf16 block linear (no quantization) and the contract every injected block linear follows.

Contract (``fp8.linear.Fp8Linear`` follows it too): ``cls(in_features, out_features, num_experts=1,
bias=False, device=None)``; state-dict key ``weight`` [num_experts·out_features, in_features] with the experts
stacked along dim 0 (video, audio, text); ``forward(x [S, in], splits=None) -> [S, out]`` bf16, where
``splits`` = rows per expert as Python ints (rows already grouped by expert, an expert may get 0 rows), and
``None`` when there is one expert.
"""

import torch
from torch import nn


class Bf16Linear(nn.Module):
    """Official ``BaseLinear``/``NativeMoELinear`` math: cast input and weight to bf16, matmul, bf16 out."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 1,
        bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        rows = num_experts * out_features
        self.weight = nn.Parameter(
            torch.empty(rows, in_features, dtype=torch.bfloat16, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(rows, dtype=torch.bfloat16, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor, splits: tuple[int, ...] | None = None) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.num_experts == 1:
            out = torch.matmul(x, self.weight.t())  # [S, out]
            return out if self.bias is None else out.add_(self.bias)
        out = x.new_empty(x.shape[0], self.out_features)  # [S, out]
        weights = self.weight.chunk(self.num_experts)
        biases = self.bias.chunk(self.num_experts) if self.bias is not None else (None,) * self.num_experts
        for rows, out_rows, weight, bias in zip(
            x.split(splits), out.split(splits), weights, biases, strict=True
        ):
            torch.matmul(rows, weight.t(), out=out_rows)
            if bias is not None:
                out_rows.add_(bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, bias={self.bias is not None}"
        )
