"""The FP8 linear layer: a float8_e4m3fn weight with float32 scale(s), run by ``torch._scaled_mm`` where the
hardware has FP8 matmuls and by dequantizing elsewhere. Optionally several experts stacked along the rows.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .capability import (
    FP8_MATMUL,
    MODES,
    choose_path,
    dequantize_compute_dtype,
    supports_rowwise_scaled_mm,
)
from .quantize import FP8_DTYPE, FP8_MAX, MIN_AMAX, Fp8Weight, Granularity

# _scaled_mm needs K and N to be multiples of 16 (M is free). MagiHuman has N = 7208 and 27304, K = 13652.
ALIGN = 16
# Elements per chunk of the activation quantization (float32 temporaries of 64 MB).
QUANT_ELEMENTS = 1 << 24


# Output elements of one GEMM call above which a block linear runs in row chunks: 128 MiB of bf16 output (at
# the DiT's widest output, 27,304 columns, chunks of 2,457 rows: still full-size GEMMs).
ROW_CHUNK_ELEMENTS = 1 << 26

Epilogue = Callable[[torch.Tensor], torch.Tensor]  # row-wise: [rows, N] bf16 -> [rows, W]
ExpertMatmul = Callable[[torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]]


def rows_per_chunk(width: int) -> int:
    """Rows of one chunk of row-wise work (a GEMM call, a norm) with ``width`` output columns."""
    return max(1, ROW_CHUNK_ELEMENTS // width)


def chunked_experts(
    x: torch.Tensor,
    splits: tuple[int, ...],
    width: int,
    expert_matmul: ExpertMatmul,
    epilogue: Epilogue | None,
) -> torch.Tensor:
    """A stacked-expert linear over x [S, K] whose rows are grouped by expert in ``splits``, in row chunks.

    ``expert_matmul(rows, e)`` prepares expert ``e`` from all of its rows (e.g. their activation scale) and
    returns the matmul of a chunk of them ([r, K] -> [r, width] bf16). ``epilogue`` maps each chunk's output
    row-wise as soon as it exists. One expert in one chunk returns its GEMM's output itself (no copy)."""
    step = rows_per_chunk(width)
    used = [expert for expert, count in enumerate(splits) if count]
    if not used:  # an expert's activation scale over no rows would raise
        y = x.new_empty((0, width), dtype=torch.bfloat16)
        return y if epilogue is None else epilogue(y)
    if len(used) == 1 and x.shape[0] <= step:
        y = expert_matmul(x, used[0])(x)  # [S, width]
        return y if epilogue is None else epilogue(y)
    out, start = None, 0
    for expert, count in enumerate(splits):
        rows = x[start : start + count]
        matmul = expert_matmul(rows, expert) if count else None
        for offset in range(0, count, step):
            part = matmul(rows[offset : offset + step])  # [r, width]
            part = part if epilogue is None else epilogue(part)  # [r, W]
            if out is None:
                out = x.new_empty((x.shape[0], part.shape[1]), dtype=part.dtype)  # [S, W]
            out[start + offset : start + offset + part.shape[0]] = part
            del part  # freed before the next chunk's GEMM allocates its output
        start += count
    return out


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _fp8_zeros(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    # Allocated as bytes: fill kernels for float8 are missing on some torch/device pairs; byte 0 is +0.0.
    return torch.zeros(rows, cols, dtype=torch.uint8, device=device).view(FP8_DTYPE)


def scale_to_fp8(x: torch.Tensor, x_scale: torch.Tensor, padded_in: int) -> torch.Tensor:
    """x [tokens, K] / scale, clamped to ±448, cast to FP8 and zero-padded to [tokens, padded_in].

    In row chunks straight into the FP8 operand: float32 temporaries of QUANT_ELEMENTS, not of the whole
    activation (at 1080p SR, [65.7k, 13652] would be 3.6 GB per float32 copy)."""
    tokens, k = x.shape
    x8 = torch.empty(tokens, padded_in, dtype=torch.uint8, device=x.device)  # [tokens, K_padded]
    x8[:, k:].zero_()
    x8 = x8.view(FP8_DTYPE)
    step = max(1, QUANT_ELEMENTS // k)
    for start in range(0, tokens, step):
        chunk = x[start : start + step].to(torch.float32, copy=True).div_(x_scale).clamp_(-FP8_MAX, FP8_MAX)
        x8[start : start + step, :k] = chunk  # the assignment casts to FP8
    return x8


def scale_to_fp8_fusible(x: torch.Tensor, x_scale: torch.Tensor, padded_in: int) -> torch.Tensor:
    """:func:`scale_to_fp8` written for ``torch.compile``, which turns it into one kernel (read bf16, write
    FP8, no float32 temporary); the same bytes. Eager it would hold a padded float32 copy: never run it so."""
    scaled = (x.to(torch.float32) / x_scale).clamp(-FP8_MAX, FP8_MAX)
    return F.pad(scaled, (0, padded_in - x.shape[1])).to(FP8_DTYPE)


class Fp8Linear(nn.Module):
    """``y = x @ Wᵀ (+ bias)`` with W stored in FP8, for ``num_experts`` weights stacked as [E·N, K].

    State dict: ``weight`` float8_e4m3fn [E·N, K] and ``weight_scale`` float32 of shape [] (per tensor),
    [E] (per expert) or [E·N] (per row), plus ``bias`` [E·N] when ``bias=True``. Loading (``assign=True``
    included) pads the weight once to multiples of 16 inside ``weight_padded``; ``weight`` and
    ``state_dict()`` show the checkpoint shape as a view of it (non-contiguous when K was padded: call
    ``.contiguous()`` before saving it with safetensors).

    ``mode``: ``auto``, ``fp8-matmul`` or ``dequantize`` (see :mod:`.capability`), resolved into ``path``
    when the module gets a real device (built, loaded or moved), never per call. Dtype conversions of the
    module (``.half()``, ``.to(torch.bfloat16)``...) are refused because they would drop the scales.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 1,
        bias: bool = False,
        mode: str = "auto",
        device: torch.device | str | None = None,
        fast_accum: bool = False,
    ):
        super().__init__()
        if min(in_features, out_features, num_experts) < 1:
            raise ValueError(
                f"Fp8Linear needs positive sizes, got in={in_features} out={out_features} "
                f"experts={num_experts}"
            )
        if mode not in MODES:
            raise ValueError(f"Fp8Linear mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.mode = mode
        self.fast_accum = fast_accum  # _scaled_mm use_fast_accum: faster on Hopper, less exact accumulation
        self.rows = num_experts * out_features
        self.padded_out, self.padded_in = _round_up(out_features), _round_up(in_features)
        # Expert e multiplies rows [e·N, e·N + N_padded): the rows past e·N + N belong to the next expert (or
        # to the padding tail) and only make output columns that are cut off: no per-expert padding needed.
        storage_rows = self.rows + self.padded_out - out_features
        placeholder = torch.empty(storage_rows, self.padded_in, dtype=FP8_DTYPE, device=device)
        self.weight_padded = nn.Parameter(placeholder, requires_grad=False)
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32, device=device))
        # Per-row scales laid out for _scaled_mm's row-wise mode: [E, 1, N_padded]; None otherwise.
        self.register_buffer("row_scale_padded", None, persistent=False)
        if bias:
            placeholder = torch.empty(self.rows, dtype=torch.bfloat16, device=device)
            self.bias = nn.Parameter(placeholder, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.path: str | None = None
        self.compute_dtype = torch.bfloat16  # of the dequantize path; set with the path
        # Per-row scales on the fp8-matmul path: row-wise _scaled_mm where the device has it, else a
        # per-tensor GEMM whose output columns are scaled afterwards (same maths). Set with the path.
        self.rowwise = False
        self.scale_input = scale_to_fp8  # or a compiled scale_to_fp8_fusible (pipeline/dit/fusion.py)
        self._resolve_path()

    @classmethod
    def from_fp8(
        cls,
        weight: Fp8Weight,
        num_experts: int = 1,
        bias: torch.Tensor | None = None,
        mode: str = "auto",
        **kwargs,
    ) -> "Fp8Linear":
        """Build on the meta device and load ``weight`` (and ``bias``) the way the DiT loader does."""
        rows, in_features = weight.shape
        module = cls(in_features, rows // num_experts, num_experts, bias is not None, mode, "meta", **kwargs)
        state = weight.state_dict() | ({"bias": bias} if bias is not None else {})
        module.load_state_dict(state, strict=True, assign=True)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The FP8 weight in checkpoint shape [E·N, K], a view of ``weight_padded``."""
        return self.weight_padded[: self.rows, : self.in_features]

    @property
    def granularity(self) -> Granularity:
        if self.weight_scale.ndim == 0:
            return Granularity.TENSOR
        return Granularity.ROW if self.weight_scale.shape[0] == self.rows else Granularity.EXPERT

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, bias={self.bias is not None}, mode={self.mode}, "
            f"path={self.path}"
        )

    # ---- loading, saving, moving ----

    def _resolve_path(self) -> None:
        device = self.weight_padded.device
        if device.type != "meta":
            self.compute_on(device)

    def compute_on(self, device: torch.device | str) -> None:
        """Run on ``device`` while the weights are stored elsewhere (block swap keeps them in CPU memory and
        brings them in per call): resolve the matmul path for the compute device."""
        self.path = choose_path(self.mode, device)
        self.compute_dtype = dequantize_compute_dtype(device)
        self.rowwise = (
            self.path == FP8_MATMUL
            and self.row_scale_padded is not None
            and supports_rowwise_scaled_mm(device, self.fast_accum)
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        tensors = {"weight": self.weight, "weight_scale": self.weight_scale, "bias": self.bias}
        for name, tensor in tensors.items():
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = ("weight", "weight_scale") + (("bias",) if self.bias is not None else ())
        if strict:
            ours = (k for k in state_dict if k.startswith(prefix))
            unexpected_keys.extend(k for k in ours if k[len(prefix) :] not in names)
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        weight, scale = state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"]
        bias = state_dict.get(prefix + "bias")
        problem = self._check(weight, scale, bias)
        if problem:
            error_msgs.append(f"{prefix}weight: {problem}")
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        if not assign and self.weight_padded.device.type != "meta":
            device = self.weight_padded.device  # a copying load keeps the module where it is
            weight, scale = weight.to(device), scale.to(device)
            bias = bias.to(device) if bias is not None else None
        self.weight_padded = nn.Parameter(self._pad(weight), requires_grad=False)
        self.weight_scale = scale.reshape(()) if scale.numel() == 1 else scale
        self.row_scale_padded = self._row_scales_for_scaled_mm()
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self._resolve_path()

    def _check(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> str | None:
        expected = (self.rows, self.in_features)
        if weight.dtype != FP8_DTYPE or tuple(weight.shape) != expected:
            return (
                f"expected float8_e4m3fn {list(expected)}, got {weight.dtype} {list(weight.shape)}. An FP8 "
                "linear loads FP8 weights with their scale; quantize high-precision weights first "
                "(fp8.quantize)."
            )
        shapes = {(), (1,), (self.num_experts,), (self.rows,)}
        if scale.dtype != torch.float32 or tuple(scale.shape) not in shapes:
            return (
                f"weight_scale must be float32 of shape [], [{self.num_experts}] or [{self.rows}], "
                f"got {scale.dtype} {list(scale.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (self.rows,):
            return f"bias must have shape [{self.rows}], got {list(bias.shape)}"
        return None

    def empty_weight(self, device: torch.device | str) -> torch.Tensor:
        """The [E·N, K] view of a new, uninitialised padded weight buffer on ``device``, for the loader to
        read the checkpoint tensor into: loading that view adopts the buffer, so the weight is not copied."""
        storage_rows = self.rows + self.padded_out - self.out_features
        buffer = torch.empty(storage_rows, self.padded_in, dtype=torch.uint8, device=device).view(FP8_DTYPE)
        return buffer[: self.rows, : self.in_features]

    def _pad(self, weight: torch.Tensor) -> torch.Tensor:
        rows, storage_rows = self.rows, self.rows + self.padded_out - self.out_features
        if storage_rows == rows and self.padded_in == self.in_features:
            return weight.contiguous()  # nothing to pad: the loaded tensor itself (no copy with assign=True)
        storage_bytes = storage_rows * self.padded_in
        if (
            weight.stride() == (self.padded_in, 1)
            and weight.storage_offset() == 0
            and weight.untyped_storage().nbytes() == storage_bytes
        ):
            padded = weight.as_strided((storage_rows, self.padded_in), (self.padded_in, 1))  # empty_weight's
        else:
            padded = torch.empty(storage_rows, self.padded_in, dtype=torch.uint8, device=weight.device)
            padded = padded.view(FP8_DTYPE)
            padded[:rows, : self.in_features] = weight
        # Zero padding: K columns meet the activation's zero columns (a NaN byte there would poison the
        # products); extra rows only make output columns that are cut off. Bytes: float8 fills may be missing.
        padded[rows:].view(torch.uint8).zero_()
        padded[:rows, self.in_features :].view(torch.uint8).zero_()
        return padded

    def _row_scales_for_scaled_mm(self) -> torch.Tensor | None:
        if self.granularity is not Granularity.ROW:
            return None
        scales = self.weight_scale.reshape(self.num_experts, 1, self.out_features)
        return F.pad(scales, (0, self.padded_out - self.out_features), value=1.0)  # [E, 1, N_padded]

    def _apply(self, fn, recurse=True):
        device = self.weight_padded.device
        for dtype in (FP8_DTYPE, torch.float32):
            converted = fn(torch.empty(0, dtype=dtype, device=device)).dtype
            if converted != dtype:
                raise TypeError(
                    f"Fp8Linear: this conversion would turn the {dtype} weight/scale into {converted}, which "
                    "silently drops or degrades the FP8 scales. Move FP8 modules between devices only; use "
                    "Fp8Weight.dequantize() when a high-precision weight is really needed."
                )
        module = super()._apply(fn, recurse)
        self._resolve_path()
        return module

    # ---- compute ----

    def forward(
        self, x: torch.Tensor, splits: tuple[int, ...] | None = None, epilogue: Epilogue | None = None
    ) -> torch.Tensor:
        """x [S, in_features] bf16, rows grouped by expert in ``splits`` order -> [S, out_features] bf16, or
        ``epilogue`` of it. Above :func:`rows_per_chunk` rows the GEMMs run in row chunks, each expert's
        activation scale taken over all its rows first (every row is quantized as without chunks), and
        ``epilogue`` (a row-wise function, e.g. the MLP's activation) is applied to each chunk as it is
        produced: the whole [S, out_features] output never exists (3.6 GB for an up_gate_proj at 1080p SR)."""
        splits = (x.shape[0],) if splits is None else splits
        if len(splits) != self.num_experts:
            raise ValueError(f"Fp8Linear with {self.num_experts} experts got {len(splits)} splits {splits}")
        expert_matmul = self._fp8_expert if self.path == FP8_MATMUL else self._dequantized_expert
        return chunked_experts(x, splits, self.out_features, expert_matmul, epilogue)

    def _bias(self, expert: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias[expert * self.out_features : (expert + 1) * self.out_features]

    def _fp8_expert(self, x: torch.Tensor, expert: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The matmul of expert ``expert`` for row chunks of its rows ``x`` [tokens, K]."""
        n, bias = self.out_features, self._bias(expert)
        # Dynamic per-tensor activation scale over all the expert's rows, kept on the device (no host sync).
        # amax/448 is rounded in the input dtype before going to float32, exactly as the published FP8 runtime
        # does, so outputs match it.
        amax = torch.linalg.vector_norm(x, ord=math.inf).clamp(min=MIN_AMAX)
        x_scale = (amax / FP8_MAX).to(torch.float32)

        def matmul(rows: torch.Tensor) -> torch.Tensor:
            x8 = self.scale_input(rows, x_scale, self.padded_in)  # [rows, K_padded] FP8
            y = self._gemm(x8, x_scale, expert)[:, :n]  # [rows, N]
            return y if bias is None else y + bias.to(torch.bfloat16)

        return matmul

    def _gemm(self, x8: torch.Tensor, x_scale: torch.Tensor, expert: int) -> torch.Tensor:
        """x8 [tokens, K_padded] FP8 with its 0-dim scale -> [tokens, N_padded] bf16 for one expert."""
        n = self.out_features
        weight = self.weight_padded[expert * n : expert * n + self.padded_out]  # [N_padded, K_padded]
        row_scale = None if self.row_scale_padded is None else self.row_scale_padded[expert]  # [1, N_pad]
        if row_scale is not None and self.rowwise:
            # Row-wise _scaled_mm wants [M, 1] x [1, N] scales; the activation scale is still one per call.
            scale_a, scale_b = x_scale.expand(x8.shape[0], 1).contiguous(), row_scale
        elif row_scale is not None:
            scale_a, scale_b = x_scale, x_scale.new_ones(())  # scaled per output column below
        else:
            scale_a = x_scale
            scale_b = self.weight_scale if self.weight_scale.ndim == 0 else self.weight_scale[expert]
        y = torch._scaled_mm(
            x8,
            weight.t(),
            scale_a=scale_a,
            scale_b=scale_b,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )
        y = y[0] if isinstance(y, tuple) else y  # torch 2.4 returned (out, amax)
        if row_scale is not None and not self.rowwise:
            # The activation scale is per tensor, so scaling output column j by s_j is the row-wise product;
            # fp32 multiply, one more bf16 rounding, in place on the GEMM's own output.
            y.mul_(row_scale)
        return y

    def _dequantized_expert(self, x: torch.Tensor, expert: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The matmul of expert ``expert`` for row chunks of its rows, with its weight dequantized once."""
        n, dtype = self.out_features, self.compute_dtype
        if self.granularity is Granularity.ROW:
            scale = self.weight_scale[expert * n : (expert + 1) * n, None]  # [N, 1]
        else:
            scale = self.weight_scale if self.weight_scale.ndim == 0 else self.weight_scale[expert]
        # One rounding: FP8 values are exact in bf16/fp32, and the multiply runs in float32 before the store.
        weight = self.weight[expert * n : (expert + 1) * n].to(dtype).mul_(scale)  # [N, K]
        bias = self._bias(expert)
        bias = None if bias is None else bias.to(dtype)
        return lambda rows: F.linear(rows.to(dtype), weight, bias).to(torch.bfloat16)  # [rows, N]
