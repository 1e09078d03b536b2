"""Loading a MagiHuman DiT from any published layout: a sharded folder or one file, FP8 in any convention the
FP8 reader knows, or the BF16/FP32 originals. The model is built on the meta device and every tensor is read
from its file straight into the buffer it lives in, on its final device and in its final dtype (FP8 block
weights into their padded ``_scaled_mm`` buffers); one strict ``load_state_dict(assign=True)`` adopts them.
Nothing holds a second copy: the device peak is the model plus one tensor in flight, and CPU-resident tensors
own their memory (no view keeps a shard's memory map alive).
"""

import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...fp8.capability import AUTO, DEQUANTIZE, FP8_MATMUL
from ...fp8.checkpoint import Checkpoint, CheckpointError
from ...fp8.formats import Fp8Reader
from ...fp8.linear import Fp8Linear
from ...fp8.quantize import Granularity
from .attention import make_attention
from .block_swap import BlockSwap
from .config import VARIANTS, DiTConfig
from .linear import Bf16Linear
from .model import MagiDiT

log = logging.getLogger(__name__)

BF16 = "bf16"
COMPUTE_MODES = (AUTO, FP8_MATMUL, DEQUANTIZE, BF16)
BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.linear_qkv|attention\.linear_proj|mlp\.up_gate_proj|mlp\.down_proj)\.weight"
)
# Folder/file-name hints of each variant, tried in this order ("1080p_sr_fp8", "distill_fp8", ...).
VARIANT_HINTS = (("sr_1080p", "1080"), ("sr_540p", "540"), ("distill", "distill"), ("base", "base"))


def detect_variant(path: str | Path) -> str:
    """The DiT variant named by a checkpoint's file or folder name (e.g. ``540p_sr_fp8/`` -> ``sr_540p``)."""
    name = Path(path).name.lower()
    for variant, hint in VARIANT_HINTS:
        if hint in name:
            return variant
    raise CheckpointError(
        f"{path}: cannot tell which DiT this is from its name; choose the variant explicitly "
        f"({', '.join(VARIANTS)}), or keep the published folder names (distill_fp8, base_fp8, 540p_sr_fp8, "
        "1080p_sr_fp8)"
    )


@dataclass(frozen=True)
class LoadReport:
    """What was loaded and how: for logs, the node's status text and benchmarks."""

    path: Path
    variant: str
    convention: str  # published / comfy / comfy-legacy / plain
    linear: str  # e.g. "Fp8Linear(fp8-matmul)" or "Bf16Linear"
    bytes_read: int
    seconds: float


def _linear_class(compute: str, stored_fp8: bool, granularity: Granularity, fast_accum: bool):
    """The block-linear class for a compute mode, and the granularity used when quantizing while loading."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}; got {compute!r}")
    if compute == BF16 or (compute == AUTO and not stored_fp8):
        return Bf16Linear, None
    return functools.partial(Fp8Linear, mode=compute, fast_accum=fast_accum), granularity


def _open(path: Path, variant: str, compute: str) -> tuple[Checkpoint, Fp8Reader, DiTConfig, str]:
    """The checkpoint's headers checked against the DiT they describe, and the compute mode ``auto`` means
    for this file."""
    checkpoint = Checkpoint(path)
    reader = Fp8Reader(checkpoint)
    shapes = {key: reader.info(key).shape for key in reader.keys()}
    try:
        config = DiTConfig.from_shapes(shapes, variant)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    unexpected = sorted(set(shapes) - set(config.expected_shapes()))
    if unexpected:
        file = reader.info(unexpected[0]).file
        raise CheckpointError(f"{file}: unexpected tensor '{unexpected[0]}' for a MagiHuman DiT")
    if compute == AUTO and reader.full_precision_matmul:
        compute = DEQUANTIZE  # the file asks for its FP8 weights to be multiplied in high precision
    return checkpoint, reader, config, compute


def weight_bytes(path: str | Path, variant: str | None = None, compute: str = AUTO) -> tuple[int, list[int]]:
    """(bytes of the whole model, bytes of each transformer layer) that :func:`load_dit` would hold for this
    checkpoint, from its headers alone: the same model is built on the meta device, nothing is read."""
    path = Path(path)
    checkpoint, reader, config, compute = _open(path, variant or detect_variant(path), compute)
    checkpoint.close()
    linear_cls, _ = _linear_class(compute, bool(reader.fp8_keys()), Granularity.TENSOR, False)
    model = MagiDiT(config, linear_cls=linear_cls, device="meta")

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])

    return nbytes(model), [nbytes(layer) for layer in model.block.layers]


def load_dit(
    path: str | Path,
    variant: str | None = None,
    compute: str = AUTO,
    device: torch.device | str = "cpu",
    attention: str = "sdpa",
    quantize_scales: Granularity = Granularity.TENSOR,
    swap_layers: int = 0,
    fast_accum: bool = False,
) -> tuple[MagiDiT, LoadReport]:
    """Load a DiT checkpoint for inference.

    ``compute``: ``auto`` keeps the stored precision (FP8 files -> FP8 linears whose matmul path suits the
    device; BF16/FP32 files -> bf16 linears); ``fp8-matmul`` / ``dequantize`` force FP8 linears with that
    path (BF16/FP32 files are quantized while loading, with ``quantize_scales`` granularity); ``bf16`` runs
    bf16 linears (FP8 files are dequantized while loading). ``variant`` is taken from the name when omitted.
    ``swap_layers``: keep that many of the last layers in CPU memory and stream them in per forward
    (:class:`~.block_swap.BlockSwap`); they are loaded to the CPU directly, so the device never holds them.
    ``fast_accum``: ``_scaled_mm``'s fast accumulation on the fp8-matmul path (faster on Hopper, less exact
    accumulation); off by default, as in the published FP8 runtime, until ``bench gpu-check`` has measured
    what it gains and costs.
    """
    start = time.perf_counter()
    path = Path(path)
    variant = variant or detect_variant(path)
    checkpoint, reader, config, compute = _open(path, variant, compute)
    linear_cls, granularity = _linear_class(compute, bool(reader.fp8_keys()), quantize_scales, fast_accum)
    model = MagiDiT(config, linear_cls=linear_cls, attention=make_attention(attention), device="meta")
    dtypes = {key: tensor.dtype for key, tensor in model.state_dict(keep_vars=True).items()}

    swapped = {f"block.layers.{i}." for i in range(config.num_layers - swap_layers, config.num_layers)}
    state, bytes_read = {}, 0
    for file in checkpoint.files:
        for key in (k for k in reader.keys() if reader.info(k).file == file):
            bytes_read += reader.info(key).nbytes
            target = "cpu" if swap_layers and key.startswith(tuple(swapped)) else device
            if BLOCK_LINEAR.fullmatch(key) and granularity is not None:
                experts = config.num_experts(int(key.split(".")[2]))
                module = model.get_submodule(key.removesuffix(".weight"))
                out = module.empty_weight(target)  # [E·N, K] view of the padded buffer: adopted, not copied
                weight = reader.load_fp8(key, target, granularity, num_experts=experts, out=out)
                state.update(weight.state_dict(key.removesuffix("weight")))
            else:
                state[key] = reader.load(key, target, dtypes[key])
        checkpoint.release(file)  # every tensor read from this file owns its memory
    model.load_state_dict(state, strict=True, assign=True)
    if swap_layers:
        model.block_swap = BlockSwap(model, swap_layers, device)
    report = LoadReport(
        path=path,
        variant=variant,
        convention=reader.convention.value,
        linear=f"Fp8Linear({compute})" if granularity is not None else "Bf16Linear",
        bytes_read=bytes_read,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "loaded %s DiT from %s (%s, %s) in %.1fs",
        variant,
        path,
        report.convention,
        report.linear,
        report.seconds,
    )
    return model.eval(), report
