"""Weight quantization to float8_e4m3fn: absmax scales per tensor, per expert or per row, and the FP8 weight
object that keeps an FP8 tensor and its scale together.

Numerics of the published MagiHuman FP8 conversion: ``scale = max(absmax, 1e-12) / 448``; values are divided
by the scale and clamped to ±448 before the cast, because PyTorch's cast may turn |x| ≥ 480 into NaN (the c10
conversion does; torch 2.13 on CPU saturates instead), so results never depend on the version or device.
"""

import enum
import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
MIN_AMAX = 1e-12
# The published selection rule: big matrices whose names carry none of these substrings. On the MagiHuman
# DiT it picks exactly the 160 block GEMMs (the final linears fall just under 2**20 elements).
DEFAULT_MIN_ELEMENTS = 1 << 20
SKIP_PATTERNS = ("norm", "bands", "bias", "embedder")
# Rows are processed in chunks of about this many elements so that the float32 temporaries of the largest
# MagiHuman weight (81912 x 5120) stay near 64 MB instead of 1.7 GB each.
CHUNK_ELEMENTS = 1 << 24


class Granularity(str, enum.Enum):
    """How many scales a [rows, K] weight has: one; one per expert (equal blocks of rows); one per row."""

    TENSOR = "tensor"
    EXPERT = "expert"
    ROW = "row"


class QuantizationError(ValueError):
    """A weight that cannot be quantized or an FP8 weight whose scale does not fit it."""


def should_quantize(key: str, shape: tuple[int, ...], min_elements: int = DEFAULT_MIN_ELEMENTS) -> bool:
    """The published selection rule: ndim ≥ 2, at least ``min_elements`` elements, no skip pattern in the
    name."""
    lowered = key.lower()
    skipped = any(pattern in lowered for pattern in SKIP_PATTERNS)
    return len(shape) >= 2 and math.prod(shape) >= min_elements and not skipped


def granularity_of(scale_shape: tuple[int, ...], rows: int) -> Granularity:
    """Granularity of a canonical scale shape: [] per tensor, [rows] per row, [E] (E divides rows) per
    expert."""
    if scale_shape == ():
        return Granularity.TENSOR
    if len(scale_shape) == 1 and scale_shape[0] == rows:
        return Granularity.ROW
    if len(scale_shape) == 1 and scale_shape[0] > 1 and rows % scale_shape[0] == 0:
        return Granularity.EXPERT
    raise QuantizationError(
        f"scale of shape {list(scale_shape)} fits no granularity for a weight with {rows} rows "
        f"(expected [] per tensor, [E] with E dividing {rows} per expert, or [{rows}] per row)"
    )


def canonical_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A stored scale in canonical form: [1] becomes [], [rows, 1] becomes [rows]; float32."""
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.ndim == 2 and scale.shape[1] == 1:
        scale = scale.reshape(-1)
    granularity_of(tuple(scale.shape), rows)
    return scale.to(torch.float32)


def row_scales(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The scale of every row (first dim) of a weight of ``shape``, broadcastable to it: [rows, 1, ...]
    ([1, 1, ...] per tensor). Small: never a copy of the weight."""
    ones = (1,) * (len(shape) - 1)
    if scale.ndim == 0:
        return scale.reshape((1,) + ones)
    return scale.repeat_interleave(shape[0] // scale.shape[0]).reshape((shape[0],) + ones)


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight and its float32 scale, inseparable: ``W ≈ data.float() * scale`` row by row.

    ``data`` is float8_e4m3fn [rows, K]; ``scale`` is float32 [] (per tensor), [E] (per expert: E equal
    blocks of rows) or [rows] (per row). The only high-precision view is :meth:`dequantize`, so an FP8
    weight can never be upcast without its scale.
    """

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if self.data.dtype != FP8_DTYPE or self.data.ndim < 2:
            raise QuantizationError(
                "FP8 weight data must be a float8_e4m3fn tensor of 2 or more dims, got "
                f"{self.data.dtype} {list(self.data.shape)}"
            )
        if self.scale.dtype != torch.float32:
            raise QuantizationError(f"FP8 weight scale must be float32, got {self.scale.dtype}")
        granularity_of(tuple(self.scale.shape), self.data.shape[0])

    @property
    def granularity(self) -> Granularity:
        return granularity_of(tuple(self.scale.shape), self.data.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight in ``dtype``: each FP8 value (exact in bf16, fp16, fp32) times its scale, multiplied in
        float32 and stored in ``dtype``, with no other full-size temporary."""
        return self.data.to(dtype).mul_(row_scales(self.scale, self.data.shape))  # [rows, K]

    def to(self, device: torch.device | str) -> "Fp8Weight":
        return Fp8Weight(self.data.to(device), self.scale.to(device))

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The entries an :class:`~.linear.Fp8Linear` loads: ``<prefix>weight``, ``<prefix>weight_scale``."""
        return {f"{prefix}weight": self.data, f"{prefix}weight_scale": self.scale}


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _rows(per_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start:end of a [rows, 1, ...] scale column, or the single [1, 1, ...] per-tensor scale."""
    return per_row if per_row.shape[0] == 1 else per_row[start:end]


def row_absmax(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """max |W| of every row, [rows] float32; NaN or Inf anywhere is refused, naming the tensor."""
    rows = weight.shape[0]
    matrix = weight.reshape(rows, -1)
    amax = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start, end in _row_chunks(rows, matrix.shape[1]):
        # max|x| exactly (a selection, no rounding) without an |x| temporary; NaN and Inf propagate.
        amax[start:end] = torch.linalg.vector_norm(matrix[start:end], ord=math.inf, dim=1)
    bad = ~torch.isfinite(amax)
    if bad.any():
        raise QuantizationError(
            f"'{name}' holds NaN or Inf values (first in row {int(bad.nonzero()[0])}); a scale computed from "
            "it would poison the whole tensor. Fix or re-export the source checkpoint."
        )
    return amax


def scale_from_absmax(amax: torch.Tensor, granularity: Granularity, num_experts: int = 1) -> torch.Tensor:
    """Scales from row absmaxes: [] per tensor, [num_experts] per expert, [rows] per row (float32)."""
    granularity = Granularity(granularity)
    if granularity is Granularity.TENSOR or (granularity is Granularity.EXPERT and num_experts == 1):
        amax = amax.amax()
    elif granularity is Granularity.EXPERT:
        if amax.shape[0] % num_experts:
            raise QuantizationError(f"{amax.shape[0]} rows cannot be split into {num_experts} experts")
        amax = amax.reshape(num_experts, -1).amax(dim=1)
    return amax.clamp(min=MIN_AMAX) / FP8_MAX


def quantize_with_scale(
    weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``clamp(W / scale, ±448)`` cast to float8_e4m3fn, chunk by chunk; [rows, K] on the weight's device, or
    written into ``out`` (an FP8 tensor of the weight's shape, e.g. a view of a padded buffer)."""
    per_row = row_scales(scale, weight.shape)  # [rows, 1]
    data = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device) if out is None else out
    for start, end in _row_chunks(weight.shape[0], math.prod(weight.shape[1:])):
        scaled = weight[start:end].to(torch.float32, copy=True).div_(_rows(per_row, start, end))
        data[start:end] = scaled.clamp_(-FP8_MAX, FP8_MAX)  # the assignment casts to FP8
    return data


def quantize(
    weight: torch.Tensor,
    granularity: Granularity = Granularity.TENSOR,
    num_experts: int = 1,
    name: str = "weight",
    out: torch.Tensor | None = None,
) -> Fp8Weight:
    """Quantize a high-precision [rows, K] weight (more dims are fine: rows are the first dim);
    ``num_experts`` only matters for per-expert scales; ``out`` receives the FP8 data when given."""
    if weight.ndim < 2 or not weight.is_floating_point():
        raise QuantizationError(
            f"'{name}': expected a floating weight of 2 or more dims, got {weight.dtype} {list(weight.shape)}"
        )
    scale = scale_from_absmax(row_absmax(weight, name), granularity, num_experts)
    return Fp8Weight(quantize_with_scale(weight, scale, out), scale)


def mean_relative_error(weight: torch.Tensor, fp8: Fp8Weight) -> float:
    """``mean|q·s − W| / mean|W|``, the figure the published conversion reports (about 2.25 % per tensor)."""
    per_row = row_scales(fp8.scale, weight.shape)
    error = reference = 0.0
    for start, end in _row_chunks(weight.shape[0], math.prod(weight.shape[1:])):
        exact = weight[start:end].to(torch.float32)  # a view when the source is float32: not modified
        difference = fp8.data[start:end].to(torch.float32).mul_(_rows(per_row, start, end)).sub_(exact)
        error += float(torch.linalg.vector_norm(difference, ord=1))
        reference += float(torch.linalg.vector_norm(exact, ord=1))
    return error / reference if reference else 0.0


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σref² / Σ(ref − approx)²)."""
    reference = reference.to(torch.float64)
    noise = (reference - approximation.to(torch.float64)).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
