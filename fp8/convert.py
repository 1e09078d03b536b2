"""Offline conversion of an FP32/BF16 checkpoint (one file or a sharded folder) into FP8, tensor by tensor.

Each tensor is read from its memory map, converted and appended to its output file at once, so memory stays
near one tensor and its float32 chunks, whatever the checkpoint size. Output layouts: the published one
(same shard names, ``.__fp8_scale`` keys, an index with a correct ``total_size``) or ComfyUI v0.29 (one file,
``weight_scale`` keys, ``_quantization_metadata`` in its header).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError
from .formats import (
    COMFY_FORMAT,
    COMFY_METADATA_KEY,
    PUBLISHED_QUANTIZATION,
    Convention,
    Fp8Reader,
    scale_key_for,
)
from .quantize import (
    DEFAULT_MIN_ELEMENTS,
    FP8_DTYPE,
    Fp8Weight,
    Granularity,
    QuantizationError,
    mean_relative_error,
    quantize_with_scale,
    row_absmax,
    scale_from_absmax,
    should_quantize,
)
from .writer import SafetensorsWriter

INDEX_NAME = "model.safetensors.index.json"
KEPT_DTYPE = torch.bfloat16  # the published layout stores every tensor it does not quantize in bf16
LAYER = re.compile(r"^(.*\.layers\.\d+)\.(attention|mlp)\.\w+\.weight$")


@dataclass(frozen=True)
class ConvertOptions:
    """``min_elements``: smallest tensor to quantize; ``format``: published or comfy; ``scales``: their
    granularity."""

    min_elements: int = DEFAULT_MIN_ELEMENTS
    format: Convention = Convention.PUBLISHED
    scales: Granularity = Granularity.TENSOR

    def __post_init__(self):
        object.__setattr__(self, "format", Convention(self.format))  # accept the CLI's plain strings
        object.__setattr__(self, "scales", Granularity(self.scales))
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be ≥ 0, got {self.min_elements}")
        if self.format not in (Convention.PUBLISHED, Convention.COMFY):
            raise ValueError(f"output format must be 'published' or 'comfy', got {self.format!r}")
        if self.format is Convention.COMFY and self.scales is not Granularity.TENSOR:
            raise ValueError(
                "ComfyUI's float8_e4m3fn layers hold one scale per tensor; use --scales tensor with --format "
                "comfy (per-expert and per-row scales need the published format)"
            )


@dataclass(frozen=True)
class TensorReport:
    key: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    stored_dtype: torch.dtype
    source_bytes: int
    stored_bytes: int  # with its scale
    relative_error: float | None  # mean|q·s − W| / mean|W| for quantized tensors


@dataclass(frozen=True)
class ConvertReport:
    files: tuple[Path, ...]
    tensors: tuple[TensorReport, ...]

    @property
    def quantized(self) -> tuple[TensorReport, ...]:
        return tuple(t for t in self.tensors if t.relative_error is not None)

    @property
    def mean_relative_error(self) -> float:
        errors = [t.relative_error for t in self.quantized]
        return sum(errors) / len(errors) if errors else 0.0


def magihuman_experts(checkpoint: Checkpoint, key: str) -> int:
    """Experts stacked in a MagiHuman block weight: a layer whose attention pre-norm holds E·D values for a
    D-wide input has E per-modality weights (3 in the sandwich layers, 1 elsewhere)."""
    match = LAYER.match(key)
    if not match:
        return 1
    norm, qkv = (f"{match[1]}.attention.{name}.weight" for name in ("pre_norm", "linear_qkv"))
    if norm not in checkpoint or qkv not in checkpoint:
        return 1
    experts, rest = divmod(checkpoint.info(norm).shape[0], checkpoint.info(qkv).shape[1])
    if rest or checkpoint.info(key).shape[0] % experts:
        raise CheckpointError(f"{checkpoint.info(key).file}: cannot tell how many experts '{key}' stacks")
    return experts


@dataclass(frozen=True)
class _Quantized:
    key: str
    scale_key: str
    experts: int


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    options: ConvertOptions = ConvertOptions(),
    on_tensor: Callable[[TensorReport, int, int], None] | None = None,
) -> ConvertReport:
    """Convert ``source`` into FP8 files in the new or empty folder ``output``. ``on_tensor(report,
    done_bytes, total_bytes)`` is called after each source tensor. On failure nothing is left in
    ``output``."""
    checkpoint = Checkpoint(source)
    reader = Fp8Reader(checkpoint)
    if reader.convention is not Convention.PLAIN:
        raise CheckpointError(
            f"{checkpoint.path}: already FP8 ({reader.convention.value} convention); convert needs the "
            "FP32/BF16 checkpoint"
        )
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"{output}: the output must be a new or empty folder")
    output.mkdir(parents=True, exist_ok=True)
    total = sum(checkpoint.info(k).nbytes for k in checkpoint.keys())
    tensors: list[TensorReport] = []

    def done(report: TensorReport) -> None:
        tensors.append(report)
        if on_tensor is not None:
            on_tensor(report, sum(t.source_bytes for t in tensors), total)

    written: list[Path] = []
    try:
        for name, keys in _plan(checkpoint, options).items():
            _write_file(checkpoint, output / name, keys, options, done)
            written.append(output / name)
        if options.format is Convention.PUBLISHED:
            written.append(_write_index(checkpoint, output, written, options))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return ConvertReport(tuple(written), tuple(tensors))


def _plan(checkpoint: Checkpoint, options: ConvertOptions) -> dict[str, list[str]]:
    """Output file name -> source keys: shard by shard (published) or all in one file (comfy)."""
    if options.format is Convention.COMFY:
        name = checkpoint.files[0].name if len(checkpoint.files) == 1 else "model.safetensors"
        return {name: checkpoint.keys()}
    plan: dict[str, list[str]] = {file.name: [] for file in checkpoint.files}
    for key in checkpoint.keys():
        plan[checkpoint.info(key).file.name].append(key)
    return plan


def _write_file(
    checkpoint: Checkpoint,
    path: Path,
    keys: list[str],
    options: ConvertOptions,
    done: Callable[[TensorReport], None],
) -> None:
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    quantized: dict[str, _Quantized] = {}
    for key in keys:
        info = checkpoint.info(key)
        if info.dtype.is_floating_point and should_quantize(key, info.shape, options.min_elements):
            experts = magihuman_experts(checkpoint, key) if options.scales is Granularity.EXPERT else 1
            entry = _Quantized(key, scale_key_for(options.format, key), experts)
            if options.scales is Granularity.ROW:
                scale_shape = info.shape[:1]
            else:
                scale_shape = (experts,) if experts > 1 else ()
            layout[key] = (FP8_DTYPE, info.shape)
            layout[entry.scale_key] = (torch.float32, scale_shape)
            quantized[key] = entry
        else:
            layout[key] = (KEPT_DTYPE if info.dtype.is_floating_point else info.dtype, info.shape)
    # The writer puts float32 scales before FP8 data, so all scales are computed (one pass over each weight)
    # before the first byte is written.
    scales = {entry.scale_key: _scale(checkpoint, entry, options) for entry in quantized.values()}
    with SafetensorsWriter(path, layout, _file_metadata(options, quantized)) as writer:
        for key in writer.order:
            if key in scales:
                writer.write(key, scales[key])
                continue
            info = checkpoint.info(key)
            source = checkpoint.mapped(key)  # memory-mapped, in the stored dtype
            if key in quantized:
                scale = scales[quantized[key].scale_key]
                fp8 = Fp8Weight(quantize_with_scale(source, scale), scale)
                writer.write(key, fp8.data)
                error, stored_bytes = mean_relative_error(source, fp8), fp8.data.nbytes + scale.nbytes
            else:
                kept = source.to(layout[key][0])
                writer.write(key, kept)
                error, stored_bytes = None, kept.nbytes
            del source
            checkpoint.release(info.file)  # drop the memory map: its pages would otherwise stay resident
            done(TensorReport(key, info.shape, info.dtype, layout[key][0], info.nbytes, stored_bytes, error))


def _scale(checkpoint: Checkpoint, entry: _Quantized, options: ConvertOptions) -> torch.Tensor:
    info = checkpoint.info(entry.key)
    try:
        amax = row_absmax(checkpoint.mapped(entry.key), entry.key)
    except QuantizationError as e:
        raise CheckpointError(f"{info.file}: {e}") from None
    finally:
        checkpoint.release(info.file)
    return scale_from_absmax(amax, options.scales, entry.experts)


def _file_metadata(options: ConvertOptions, quantized: dict[str, _Quantized]) -> dict[str, str]:
    metadata = {"format": "pt"}
    if options.format is Convention.COMFY and quantized:
        layers = {key.removesuffix(".weight"): {"format": COMFY_FORMAT} for key in quantized}
        metadata[COMFY_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers})
    return metadata


def _write_index(checkpoint: Checkpoint, output: Path, files: list[Path], options: ConvertOptions) -> Path:
    weight_map, total = {}, 0
    for path in files:
        converted = Checkpoint(path)  # re-read from disk: the index describes what was really written
        total += sum(converted.info(k).nbytes for k in converted.keys())
        weight_map.update(dict.fromkeys(converted.keys(), path.name))
    metadata = {k: v for k, v in checkpoint.index_metadata.items() if k != "total_size"}
    metadata |= {"total_size": total, "quantization": PUBLISHED_QUANTIZATION[options.scales]}
    index = output / INDEX_NAME
    index.write_text(
        json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    return index
