"""The DiT's shape and behaviour: one frozen ``DiTConfig``, its presets, the checkpoint key manifest it
implies, and the inverse (``DiTConfig.from_shapes``) that reads a config back from a checkpoint's shapes."""

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

CoordsStyle = Literal["v1", "v2"]

# The 1080p SR model keeps full attention on these layers and runs every other layer local (official
# SR2_1080 override). Layers 35 and 39 are local too: the rule is this list, not "every 4th layer".
SR_1080P_FULL_ATTENTION_LAYERS = (3, 7, 11, 15, 19, 23, 27, 31)

# What a checkpoint variant changes on top of the (identical) weight layout.
VARIANTS: dict[str, dict] = {
    "base": {"coords_style": "v2", "local_attention": False},
    "distill": {"coords_style": "v2", "local_attention": False},
    "sr_540p": {"coords_style": "v1", "local_attention": False},
    "sr_1080p": {"coords_style": "v1", "local_attention": True},
}


def swiglu7_width(hidden_size: int) -> int:
    """The official gated-MLP intermediate size: int(D·4·2/3) rounded down to a multiple of 4."""
    return int(hidden_size * 4 * 2 / 3) // 4 * 4


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes the DiT's tensors and math. Layer lists are sorted tuples of layer indices."""

    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads_q: int
    num_heads_kv: int
    mm_layers: tuple[int, ...]  # layers with 3 per-modality weight sets (video, audio, text)
    gelu7_layers: tuple[int, ...]  # non-gated MLP layers; all others are swiglu7
    gelu7_intermediate: int
    swiglu7_intermediate: int
    enable_attn_gating: bool = True
    coords_style: CoordsStyle = "v2"
    local_attn_layers: tuple[int, ...] = ()
    frame_receptive_field: int = 11  # local layers: video queries see latent frames f-R..f+R
    video_in_channels: int = 192  # 48 latent channels x 2x2 patch
    audio_in_channels: int = 64
    text_in_channels: int = 3584

    def __post_init__(self):
        for name in (
            "num_layers",
            "hidden_size",
            "head_dim",
            "num_heads_q",
            "num_heads_kv",
            "gelu7_intermediate",
            "swiglu7_intermediate",
            "video_in_channels",
            "audio_in_channels",
            "text_in_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads_q % self.num_heads_kv:
            raise ValueError(
                f"DiTConfig: num_heads_q ({self.num_heads_q}) must be a multiple of num_heads_kv "
                f"({self.num_heads_kv}) for grouped-query attention"
            )
        if self.head_dim % 8:
            raise ValueError(
                f"DiTConfig.head_dim must be a multiple of 8 (RoPE uses head_dim/8 bands per axis), "
                f"got {self.head_dim}"
            )
        if self.video_in_channels % 4:
            raise ValueError(
                f"DiTConfig.video_in_channels must be latent channels x 4 (2x2 patches), "
                f"got {self.video_in_channels}"
            )
        if self.coords_style not in ("v1", "v2"):
            raise ValueError(f"DiTConfig.coords_style must be 'v1' or 'v2', got {self.coords_style!r}")
        if self.frame_receptive_field < 0:
            raise ValueError(
                f"DiTConfig.frame_receptive_field must be >= 0, got {self.frame_receptive_field}"
            )
        for name in ("mm_layers", "gelu7_layers", "local_attn_layers"):
            layers = getattr(self, name)
            if not isinstance(layers, tuple) or list(layers) != sorted(set(layers)):
                raise ValueError(f"DiTConfig.{name} must be a sorted tuple of distinct ints, got {layers!r}")
            if layers and not (0 <= layers[0] and layers[-1] < self.num_layers):
                raise ValueError(f"DiTConfig.{name} {layers} has layers outside 0..{self.num_layers - 1}")

    # ---- per-layer facts ------------------------------------------------------------------------------
    def num_experts(self, layer: int) -> int:
        return 3 if layer in self.mm_layers else 1

    def is_gelu7(self, layer: int) -> bool:
        return layer in self.gelu7_layers

    def intermediate(self, layer: int) -> int:
        return self.gelu7_intermediate if self.is_gelu7(layer) else self.swiglu7_intermediate

    def is_local(self, layer: int) -> bool:
        return layer in self.local_attn_layers

    @property
    def gate_channels(self) -> int:
        return self.num_heads_q if self.enable_attn_gating else 0

    @property
    def qkv_width(self) -> int:
        """Rows of one expert's QKV weight: q | k | v | per-head gate."""
        return (self.num_heads_q + 2 * self.num_heads_kv) * self.head_dim + self.gate_channels

    @property
    def latent_channels(self) -> int:
        return self.video_in_channels // 4

    # ---- checkpoint manifest --------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict key of the model with its shape, in module order."""
        d, dh = self.hidden_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "adapter.video_embedder.weight": (d, self.video_in_channels),
            "adapter.video_embedder.bias": (d,),
            "adapter.text_embedder.weight": (d, self.text_in_channels),
            "adapter.text_embedder.bias": (d,),
            "adapter.audio_embedder.weight": (d, self.audio_in_channels),
            "adapter.audio_embedder.bias": (d,),
            "adapter.rope.bands": (dh // 8,),
        }
        for i in range(self.num_layers):
            e, inter = self.num_experts(i), self.intermediate(i)
            up = inter if self.is_gelu7(i) else 2 * inter
            p = f"block.layers.{i}."
            shapes[p + "attention.pre_norm.weight"] = (e * d,)
            shapes[p + "attention.linear_qkv.weight"] = (e * self.qkv_width, d)
            shapes[p + "attention.linear_proj.weight"] = (e * d, self.num_heads_q * dh)
            shapes[p + "attention.q_norm.weight"] = (e * dh,)
            shapes[p + "attention.k_norm.weight"] = (e * dh,)
            shapes[p + "mlp.pre_norm.weight"] = (e * d,)
            shapes[p + "mlp.up_gate_proj.weight"] = (e * up, d)
            shapes[p + "mlp.down_proj.weight"] = (e * d, inter)
        shapes["final_norm_video.weight"] = (d,)
        shapes["final_norm_audio.weight"] = (d,)
        shapes["final_linear_video.weight"] = (self.video_in_channels, d)
        shapes["final_linear_audio.weight"] = (self.audio_in_channels, d)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for size in shape:
                n *= size
            total += n
        return total

    # ---- variants and inference from a checkpoint -----------------------------------------------------
    def with_variant(self, variant: str) -> "DiTConfig":
        """The same weight layout run as ``variant`` (coordinate style and, for sr_1080p, local layers)."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown DiT variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        spec = VARIANTS[variant]
        local = ()
        if spec["local_attention"]:
            local = tuple(i for i in range(self.num_layers) if i not in SR_1080P_FULL_ATTENTION_LAYERS)
        return dataclasses.replace(self, coords_style=spec["coords_style"], local_attn_layers=local)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], variant: str) -> "DiTConfig":
        """Read the architecture from a checkpoint's ``{key: shape}`` and run it as ``variant`` (a name of
        :data:`VARIANTS` or of :data:`PRESETS`). Keys the DiT does not own (e.g. FP8 scales) are ignored;
        a missing key or a wrong shape raises ``ValueError`` naming it."""
        if variant in PRESETS:
            variant = PRESET_VARIANTS[variant]
        shapes = {key: tuple(shape) for key, shape in shapes.items()}

        def shape_of(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"not a MagiHuman DiT checkpoint: tensor '{key}' is missing")
            if len(shapes[key]) != ndim:
                raise ValueError(
                    f"not a MagiHuman DiT checkpoint: '{key}' has shape {list(shapes[key])}, "
                    f"expected {ndim} dims"
                )
            return shapes[key]

        hidden, video_in = shape_of("adapter.video_embedder.weight", 2)
        _, audio_in = shape_of("adapter.audio_embedder.weight", 2)
        _, text_in = shape_of("adapter.text_embedder.weight", 2)
        layer_ids = sorted(
            int(m.group(1))
            for key in shapes
            if (m := re.fullmatch(r"block\.layers\.(\d+)\.attention\.linear_qkv\.weight", key))
        )
        if not layer_ids or layer_ids != list(range(len(layer_ids))):
            raise ValueError(
                "not a MagiHuman DiT checkpoint: expected block.layers.0..N-1, found layer indices "
                f"{layer_ids}"
            )
        num_layers = len(layer_ids)

        experts, head_dim = [], None
        for i in range(num_layers):
            (norm,) = shape_of(f"block.layers.{i}.attention.pre_norm.weight", 1)
            if norm not in (hidden, 3 * hidden):
                raise ValueError(
                    f"not a MagiHuman DiT checkpoint: block.layers.{i}.attention.pre_norm.weight has {norm} "
                    f"entries, expected {hidden} or {3 * hidden}"
                )
            experts.append(norm // hidden)
            if experts[-1] == 1 and head_dim is None:
                head_dim = shape_of(f"block.layers.{i}.attention.q_norm.weight", 1)[0]
        if head_dim is None:  # every layer is per-modality: q_norm holds 3 head_dim chunks
            head_dim = shape_of("block.layers.0.attention.q_norm.weight", 1)[0] // 3

        proj_rows, proj_in = shape_of(f"block.layers.{num_layers - 1}.attention.linear_proj.weight", 2)
        heads_q = proj_in // head_dim
        qkv_rows = shape_of(f"block.layers.{num_layers - 1}.attention.linear_qkv.weight", 2)[0]
        kv_and_gate = qkv_rows // experts[-1] - heads_q * head_dim
        gated = kv_and_gate % (2 * head_dim) != 0
        if heads_q % (2 * head_dim) == 0:
            raise ValueError(
                f"cannot tell attention gating from the QKV width: {heads_q} query heads is a multiple of "
                f"2 x head_dim ({2 * head_dim})"
            )
        heads_kv = (kv_and_gate - (heads_q if gated else 0)) // (2 * head_dim)

        gelu7, widths = [], {}
        for i in range(num_layers):
            up = shape_of(f"block.layers.{i}.mlp.up_gate_proj.weight", 2)[0] // experts[i]
            inter = shape_of(f"block.layers.{i}.mlp.down_proj.weight", 2)[1]
            if up == inter:
                gelu7.append(i)
            widths.setdefault(up == inter, inter)
        swiglu_inter = widths.get(False, swiglu7_width(hidden))
        gelu_inter = widths.get(True, 4 * hidden)

        try:
            config = cls(
                num_layers=num_layers,
                hidden_size=hidden,
                head_dim=head_dim,
                num_heads_q=heads_q,
                num_heads_kv=heads_kv,
                mm_layers=tuple(i for i in range(num_layers) if experts[i] == 3),
                gelu7_layers=tuple(gelu7),
                gelu7_intermediate=gelu_inter,
                swiglu7_intermediate=swiglu_inter,
                enable_attn_gating=gated,
                video_in_channels=video_in,
                audio_in_channels=audio_in,
                text_in_channels=text_in,
            ).with_variant(variant)
        except ValueError as e:
            raise ValueError(
                f"not a MagiHuman DiT checkpoint: the tensor shapes imply an invalid config ({e})"
            ) from e
        for key, expected in config.expected_shapes().items():
            found = shapes.get(key)
            if found != expected:
                what = "is missing" if found is None else f"has shape {list(found)}"
                raise ValueError(
                    f"not a MagiHuman DiT checkpoint: '{key}' {what}; the other tensors imply "
                    f"{list(expected)}"
                )
        return config


_FULL = DiTConfig(
    num_layers=40,
    hidden_size=5120,
    head_dim=128,
    num_heads_q=40,
    num_heads_kv=8,
    mm_layers=(0, 1, 2, 3, 36, 37, 38, 39),
    gelu7_layers=(0, 1, 2, 3),
    gelu7_intermediate=4 * 5120,
    swiglu7_intermediate=swiglu7_width(5120),
)

# The golden fixtures' tiny architecture (6 layers, width 128, head_dim 16, GQA 8:2, real in-channels).
_TINY = DiTConfig(
    num_layers=6,
    hidden_size=128,
    head_dim=16,
    num_heads_q=8,
    num_heads_kv=2,
    mm_layers=(0, 1, 4, 5),
    gelu7_layers=(0, 1),
    gelu7_intermediate=4 * 128,
    swiglu7_intermediate=swiglu7_width(128),
)

# The command-line demo's random model: 4 layers of width 256, big enough that the published FP8 selection
# rule (with a lowered size threshold) picks exactly the block linears, as it does on the real model.
_DEMO = DiTConfig(
    num_layers=4,
    hidden_size=256,
    head_dim=64,
    num_heads_q=4,
    num_heads_kv=2,
    mm_layers=(0, 3),
    gelu7_layers=(0,),
    gelu7_intermediate=4 * 256,
    swiglu7_intermediate=swiglu7_width(256),
)

PRESET_VARIANTS = {
    "base": "base",
    "distill": "distill",
    "sr_540p": "sr_540p",
    "sr_1080p": "sr_1080p",
    "tiny": "base",
    "tiny_sr_1080p": "sr_1080p",
    "demo": "distill",
    "demo_sr": "sr_540p",
}
_ARCHITECTURES = {"tiny": _TINY, "demo": _DEMO}
PRESETS: dict[str, DiTConfig] = {
    name: _ARCHITECTURES.get(name.split("_")[0], _FULL).with_variant(variant)
    for name, variant in PRESET_VARIANTS.items()
}
