"""The plain bf16 block linear (no quantization) and the contract every injected block linear follows.

Contract (``fp8.linear.Fp8Linear`` follows it too): ``cls(in_features, out_features, num_experts=1,
bias=False, device=None)``; state-dict key ``weight`` [num_experts·out_features, in_features] with the experts
stacked along dim 0 (video, audio, text); ``forward(x [S, in], splits=None) -> [S, out]`` bf16, where
``splits`` = rows per expert as Python ints (rows already grouped by expert, an expert may get 0 rows), and
``None`` when there is one expert; ``forward(x, splits, epilogue=f)`` returns ``f`` of the output, applied
row-wise to each row chunk as it is produced, so that a wide output (the MLP's up_gate_proj) never exists
whole: both linears run through :func:`fp8.linear.chunked_experts`.
"""

import torch
from torch import nn

from ...fp8.linear import Epilogue, chunked_experts


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

    def forward(
        self, x: torch.Tensor, splits: tuple[int, ...] | None = None, epilogue: Epilogue | None = None
    ) -> torch.Tensor:
        splits = (x.shape[0],) if splits is None else splits
        if len(splits) != self.num_experts:
            raise ValueError(f"Bf16Linear with {self.num_experts} experts got {len(splits)} splits {splits}")
        return chunked_experts(x.to(torch.bfloat16), splits, self.out_features, self._expert, epilogue)

    def _expert(self, x: torch.Tensor, expert: int):
        """The matmul of one expert (the same for every chunk of its rows)."""
        n = self.out_features
        weight = self.weight[expert * n : (expert + 1) * n]  # [N, K]
        bias = None if self.bias is None else self.bias[expert * n : (expert + 1) * n]

        def matmul(rows: torch.Tensor) -> torch.Tensor:
            y = torch.matmul(rows, weight.t())  # [rows, N]
            return y if bias is None else y.add_(bias)

        return matmul

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, bias={self.bias is not None}"
        )
