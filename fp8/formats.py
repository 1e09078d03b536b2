"""Every FP8 checkpoint convention read into one internal form: an FP8 weight ``<m>.weight`` always comes
as an :class:`~.quantize.Fp8Weight` (data plus float32 scale), every other tensor unchanged under its name.

Conventions: the published MagiHuman FP8 files (``<weight key>.__fp8_scale``), ComfyUI v0.29 mixed precision
(``<m>.weight_scale`` with ``<m>.comfy_quant`` tensors or ``_quantization_metadata`` in the header), ComfyUI's
legacy scaled FP8 (``<m>.scale_weight`` with a ``scaled_fp8`` marker), and plain BF16/FP32 checkpoints.
"""

import enum
import json
import logging
import math

import torch

from .checkpoint import Checkpoint, CheckpointError, TensorInfo
from .quantize import (
    FP8_DTYPE,
    Fp8Weight,
    Granularity,
    QuantizationError,
    canonical_scale,
    granularity_of,
    quantize,
)

log = logging.getLogger(__name__)

PUBLISHED_SCALE_SUFFIX = ".__fp8_scale"
# Index metadata value of the published files, and the ones this pack writes for finer scales.
PUBLISHED_QUANTIZATION = {
    Granularity.TENSOR: "fp8_e4m3fn_per_tensor",
    Granularity.EXPERT: "fp8_e4m3fn_per_expert",
    Granularity.ROW: "fp8_e4m3fn_per_row",
}
COMFY_METADATA_KEY = "_quantization_metadata"
COMFY_FORMAT = "float8_e4m3fn"
# Per-layer keys of a ComfyUI float8 layer config; any other key could change the meaning, so it is refused.
COMFY_LAYER_KEYS = {"format", "full_precision_matrix_mult"}
KNOWN_METADATA = {"quantization", COMFY_METADATA_KEY}


class Convention(str, enum.Enum):
    PUBLISHED = "published"  # SanDiegoDude/daVinci-MagiHuman-FP8 and this pack's converter default
    COMFY = "comfy"  # ComfyUI v0.29 mixed precision
    COMFY_LEGACY = "comfy-legacy"  # ComfyUI scaled_fp8
    PLAIN = "plain"  # no FP8 at all


class FormatError(CheckpointError):
    """Quantization in a checkpoint that is unknown, contradictory or incomplete; the message says where."""


def scale_key_for(convention: Convention, weight_key: str) -> str:
    """Where ``convention`` stores the scale of ``weight_key``."""
    if convention is Convention.PUBLISHED:
        return weight_key + PUBLISHED_SCALE_SUFFIX
    if not weight_key.endswith(".weight"):
        raise FormatError(f"'{weight_key}': ComfyUI names scales after '<module>.weight' keys only")
    module = weight_key.removesuffix(".weight")
    return module + (".weight_scale" if convention is Convention.COMFY else ".scale_weight")


def _canonical_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if math.prod(shape) == 1:
        return ()
    return shape[:1] if len(shape) == 2 and shape[1] == 1 else shape


class Fp8Reader:
    """A :class:`Checkpoint` read through its FP8 convention, detected and validated from the headers.

    ``keys()`` are the internal names: FP8 weights under their weight key, everything else unchanged; scale
    keys and markers are consumed. ``load_fp8`` gives an :class:`Fp8Weight` (stored FP8 as it is, or a
    high-precision weight quantized while loading); ``load`` gives a high-precision tensor (FP8 weights
    dequantized with their scale). A bare FP8 tensor without its scale is never returned.

    Static activation scales (``input_scale``/``scale_input``) are not used: this pack scales activations
    dynamically on every call (absmax/448, which never clips). Scales of 1.0 mean "none" in ComfyUI; others
    are listed in ``ignored_input_scales`` and logged as a warning, because ComfyUI's own FP8 path would
    round activations on that static grid instead.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.full_precision_matmul = False  # ComfyUI's request to run these layers without FP8 matmuls
        self._scales: dict[str, str] = {}  # FP8 weight key -> scale key
        self._consumed: set[str] = set()  # scale, marker and input-scale keys (not exposed)
        self._input_scales: dict[str, str] = {}  # FP8 weight key -> static input scale key
        self._check_metadata_names()
        self.convention = self._detect()
        if self.convention is Convention.PUBLISHED:
            self._read_published()
        elif self.convention is Convention.COMFY:
            self._read_comfy()
        elif self.convention is Convention.COMFY_LEGACY:
            self._read_comfy_legacy()
        self.granularities = frozenset(self._check_pairs())
        self._check_published_metadata()
        self.ignored_input_scales = self._check_input_scales()
        log.info(
            "%s: %s convention, %d FP8 weights (%s scales)",
            checkpoint.path,
            self.convention.value,
            len(self._scales),
            ", ".join(sorted(g.value for g in self.granularities)) or "no",
        )
        if self.ignored_input_scales:
            log.warning(
                "%s: %d static input scales are not used; activations are scaled dynamically per call "
                "(e.g. '%s')",
                checkpoint.path,
                len(self.ignored_input_scales),
                self.ignored_input_scales[0],
            )

    # ---- what the checkpoint holds ----

    def keys(self) -> list[str]:
        return [k for k in self.checkpoint.keys() if k not in self._consumed]

    def is_fp8(self, key: str) -> bool:
        return key in self._scales

    def fp8_keys(self) -> list[str]:
        return list(self._scales)

    def info(self, key: str) -> TensorInfo:
        if key in self._consumed:
            raise FormatError(f"{self.checkpoint.path}: '{key}' is quantization bookkeeping, not a weight")
        return self.checkpoint.info(key)

    def load(self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """A high-precision tensor: stored tensors converted to ``dtype``; FP8 weights dequantized with their
        scale (to ``dtype``, default bfloat16)."""
        if key in self._scales:
            return self.load_fp8(key, device).dequantize(dtype or torch.bfloat16)
        self.info(key)  # refuses scale and marker keys
        return self.checkpoint.load(key, device, dtype)

    def load_fp8(
        self,
        key: str,
        device: torch.device | str = "cpu",
        scales: Granularity = Granularity.TENSOR,
        num_experts: int = 1,
        out: torch.Tensor | None = None,
    ) -> Fp8Weight:
        """An FP8 weight with its scale, on ``device``. Stored FP8 weights come as stored (``scales`` is then
        ignored: their granularity is fixed); high-precision weights are quantized while loading. ``out``: a
        float8_e4m3fn tensor of the weight's shape (e.g. the unpadded view of a padded buffer) that receives
        the data, so the weight is read straight into its final memory."""
        if key not in self._scales:
            info = self.info(key)
            if len(info.shape) < 2 or not info.dtype.is_floating_point:
                raise FormatError(
                    f"{info.file}: '{key}' is {info.dtype} {list(info.shape)}, not a weight matrix"
                )
            try:
                source = self.checkpoint.mapped(key).to(device)  # on CPU: streamed from the map, not kept
                return quantize(source, scales, num_experts, name=key, out=out)
            except QuantizationError as e:
                raise FormatError(f"{info.file}: {e}") from None
        scale_key = self._scales[key]
        if out is None:
            data = self.checkpoint.load(key, device)
        else:
            data = self.checkpoint.load_into(key, out)
        scale = canonical_scale(self.checkpoint.load(scale_key, dtype=torch.float32), data.shape[0])
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            file = self.checkpoint.info(scale_key).file
            raise FormatError(f"{file}: scale '{scale_key}' holds zero, negative, NaN or Inf values")
        return Fp8Weight(data, scale.to(device))

    # ---- detection ----

    def _metadata_sources(self) -> list[tuple[str, dict]]:
        sources = [(str(file), metadata) for file, metadata in self.checkpoint.file_metadata.items()]
        return sources + [(f"{self.checkpoint.path} (index)", self.checkpoint.index_metadata)]

    def _check_metadata_names(self) -> None:
        for where, metadata in self._metadata_sources():
            for name in metadata:
                if "quant" in name.lower() and name not in KNOWN_METADATA:
                    raise FormatError(
                        f"{where}: unknown quantization metadata '{name}'. Readable FP8 conventions: the "
                        "published '.__fp8_scale' files, ComfyUI's weight_scale/comfy_quant and scaled_fp8."
                    )

    def _detect(self) -> Convention:
        keys = self.checkpoint.keys()
        signals = {
            Convention.PUBLISHED: [k for k in keys if k.endswith(PUBLISHED_SCALE_SUFFIX)],
            Convention.COMFY: [
                k for k in keys if k.endswith((".weight_scale", ".input_scale", ".comfy_quant"))
            ],
            Convention.COMFY_LEGACY: [
                k
                for k in keys
                if k.endswith((".scale_weight", ".scale_input", ".scaled_fp8")) or k == "scaled_fp8"
            ],
        }
        if "quantization" in self.checkpoint.metadata:
            signals[Convention.PUBLISHED].append("metadata 'quantization'")
        for where, metadata in self._metadata_sources():
            if COMFY_METADATA_KEY in metadata:
                signals[Convention.COMFY].append(f"{where} header '{COMFY_METADATA_KEY}'")
        found = {convention: names for convention, names in signals.items() if names}
        if len(found) > 1:
            mixed = "; ".join(f"{c.value} ('{names[0]}')" for c, names in found.items())
            raise FormatError(f"{self.checkpoint.path}: mixes FP8 conventions: {mixed}. Re-export it in one.")
        for key in keys:
            dtype = self.checkpoint.info(key).dtype
            if dtype.is_floating_point and dtype.itemsize == 1 and dtype != FP8_DTYPE:
                info = self.checkpoint.info(key)
                raise FormatError(
                    f"{info.file}: '{key}' is {dtype}; only float8_e4m3fn FP8 weights are supported"
                )
        return next(iter(found), Convention.PLAIN)

    def _read_published(self) -> None:
        for key in self.checkpoint.keys():
            if key.endswith(PUBLISHED_SCALE_SUFFIX):
                self._scales[key.removesuffix(PUBLISHED_SCALE_SUFFIX)] = key
                self._consumed.add(key)

    def _read_comfy(self) -> None:
        layers: dict[str, dict] = {}  # module -> layer config, from comfy_quant tensors and headers
        for key in self.checkpoint.keys():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight_scale":
                self._scales[module + ".weight"] = key
            elif leaf == "input_scale":
                self._input_scales[module + ".weight"] = key
            elif leaf == "comfy_quant":
                raw = bytes(self.checkpoint.load(key).tolist())
                self._add_layer(layers, module, raw, str(self.checkpoint.info(key).file), key)
            else:
                continue
            self._consumed.add(key)
        for where, metadata in self._metadata_sources():
            if COMFY_METADATA_KEY in metadata:
                try:
                    header_layers = json.loads(metadata[COMFY_METADATA_KEY])["layers"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise FormatError(f"{where}: unreadable '{COMFY_METADATA_KEY}' ({e!r})") from None
                for module, config in header_layers.items():
                    self._add_layer(layers, module, json.dumps(config), where, COMFY_METADATA_KEY)
        for config in layers.values():
            self.full_precision_matmul |= bool(config.get("full_precision_matrix_mult", False))
        modules = {weight.removesuffix(".weight") for weight in self._scales}
        if layers and set(layers) != modules:
            odd = sorted(set(layers) ^ modules)[0]
            raise FormatError(
                f"{self.checkpoint.path}: the quantization configs and the scaled FP8 weights disagree about "
                f"layer '{odd}' (it has one but not the other)"
            )

    def _add_layer(self, layers: dict, module: str, raw, where: str, name: str) -> None:
        try:
            config = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{where}: '{name}' is not JSON ({e})") from None
        if (
            not isinstance(config, dict)
            or config.get("format") != COMFY_FORMAT
            or set(config) - COMFY_LAYER_KEYS
        ):
            raise FormatError(
                f"{where}: layer '{module}' has quantization config {config}; only "
                f'{{"format": "{COMFY_FORMAT}"}} (optionally with full_precision_matrix_mult) is supported'
            )
        if layers.setdefault(module, config) != config:
            raise FormatError(
                f"{where}: layer '{module}' has two different configs: {layers[module]} and {config}"
            )

    def _read_comfy_legacy(self) -> None:
        for key in self.checkpoint.keys():
            module, _, leaf = key.rpartition(".")
            if leaf == "scale_weight":
                self._scales[module + ".weight"] = key
            elif leaf == "scale_input":
                self._input_scales[module + ".weight"] = key
            elif leaf == "scaled_fp8":
                info = self.checkpoint.info(key)
                if info.dtype not in (FP8_DTYPE, torch.float32):  # ComfyUI reads float32 as float8_e4m3fn
                    raise FormatError(
                        f"{info.file}: marker '{key}' names {info.dtype}; only e4m3fn is supported"
                    )
                self.full_precision_matmul = math.prod(info.shape) == 2
            else:
                continue
            self._consumed.add(key)

    def _check_pairs(self) -> set[Granularity]:
        """Every FP8 tensor has exactly one fitting scale and every scale an FP8 weight; the granularities."""
        for key in self.checkpoint.keys():
            info = self.checkpoint.info(key)
            if info.dtype == FP8_DTYPE and key not in self._scales and key not in self._consumed:
                raise FormatError(
                    f"{info.file}: FP8 tensor '{key}' has no scale (looked for "
                    f"'{key}{PUBLISHED_SCALE_SUFFIX}', '<module>.weight_scale', '<module>.scale_weight'). "
                    "An FP8 weight without its scale cannot be used: it is the weight divided by an "
                    "unknown factor."
                )
        granularities = set()
        for weight_key, scale_key in self._scales.items():
            scale = self._scale_info(weight_key, scale_key)
            rows = self.checkpoint.info(weight_key).shape[0]
            try:
                granularities.add(granularity_of(_canonical_shape(scale.shape), rows))
            except QuantizationError as e:
                raise FormatError(f"{scale.file}: '{scale_key}': {e}") from None
        for weight_key, scale_key in self._input_scales.items():
            scale = self._scale_info(weight_key, scale_key)
            if math.prod(scale.shape) != 1:
                raise FormatError(
                    f"{scale.file}: input scale '{scale_key}' is not a scalar ({list(scale.shape)})"
                )
        return granularities

    def _scale_info(self, weight_key: str, scale_key: str) -> TensorInfo:
        """The header entry of a scale, after checking that it is a float and that its weight is FP8."""
        scale = self.checkpoint.info(scale_key)
        weight = self.checkpoint.info(weight_key).dtype if weight_key in self.checkpoint else "absent"
        if weight != FP8_DTYPE:
            raise FormatError(
                f"{scale.file}: '{scale_key}' belongs to '{weight_key}', which is {weight}, not float8_e4m3fn"
            )
        if not scale.dtype.is_floating_point or scale.dtype.itemsize < 2:
            raise FormatError(f"{scale.file}: scale '{scale_key}' has dtype {scale.dtype}, not a float")
        return scale

    def _check_published_metadata(self) -> None:
        value = self.checkpoint.metadata.get("quantization")
        if value is None:
            return
        declared = {v: g for g, v in PUBLISHED_QUANTIZATION.items()}.get(value)
        if declared is None:
            raise FormatError(
                f"{self.checkpoint.path}: unknown metadata quantization '{value}' (known: "
                f"{', '.join(PUBLISHED_QUANTIZATION.values())})"
            )
        allowed = {declared, Granularity.TENSOR} if declared is Granularity.EXPERT else {declared}
        if not self.granularities or not self.granularities <= allowed:
            found = ", ".join(sorted(g.value for g in self.granularities)) or "no FP8 weights"
            raise FormatError(
                f"{self.checkpoint.path}: metadata says '{value}' but the scales found are: {found}"
            )

    def _check_input_scales(self) -> list[str]:
        ignored = []
        for key in self._input_scales.values():
            value = float(self.checkpoint.load(key, dtype=torch.float32).reshape(()))
            if not (math.isfinite(value) and value > 0):
                raise FormatError(f"{self.checkpoint.info(key).file}: input scale '{key}' is {value}")
            if value != 1.0:
                ignored.append(key)
        return ignored
