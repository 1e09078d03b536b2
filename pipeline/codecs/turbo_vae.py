"""The Turbo VAE decoder: a light decoder for the Wan2.2 latent space (16x spatial, 4x temporal), built from
its JSON config and run over the latent frames in overlapping windows. Module names follow the checkpoint keys
(``decoder.conv_in.conv.weight``, ``decoder.up_blocks.0.upsamplers.0.time_conv.conv.weight``, ...)."""

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...fp8.checkpoint import Checkpoint, CheckpointError
from ..weights.torch_files import assign_weights, load_torch_file
from .pointwise_conv import pointwise_conv3d
from .wan_stats import denormalize

# Elements per chunk of the float32 temporaries of rms_channels and per call of the nearest upsample: a 1080p
# window's [1, 128, 36, 544, 960] activation is 2.4e9 elements, whose float32 copies would be 9.6 GB each, and
# CUDA's nearest upsample was silently wrong above 2**31 output elements before pytorch#141923.
CHUNK_ELEMENTS = 1 << 26

# A k=3 Conv3d whose input or output has more than 2**31 elements (a 1080p window's 128-wide ResBlock input is
# [1, 128, 38, 544, 960] = 2.5e9) cannot be split by batch at N = 1: before cuDNN 9.3 torch then falls back
# to slow_conv3d, whose column buffer is about 130 GB (GPU_REVIEW.md O5). Convs above 2**29 elements (the
# 64-wide ones at 1080p too) run in chunks of output frames of at most CONV_CHUNK_ELEMENTS input and output
# elements each (512 MB in bf16): no whole padded or normalised copy of their input is then made either
# (one 1080p window: 13.4 -> 10.2 GiB predicted).
CONV_SPLIT_ELEMENTS = 1 << 29
CONV_CHUNK_ELEMENTS = 1 << 28

Prepare = Callable[[torch.Tensor], torch.Tensor]


def rms_channels(x: torch.Tensor, eps: float, inplace: bool = False) -> torch.Tensor:
    """RMS-normalise over channels (dim 1) with a float32 variance; no affine weight; dtype kept. The variance
    is computed in slices along dim 2 and the product is computed in float32 and stored in x's dtype, so no
    float32 copy of the whole activation is made (same values as ``(x * rsqrt(mean(x.float()²))).to(x.dtype)``
    with eps inside the root)."""
    variance = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(1, x[:, :, :1].numel()))
    for start in range(0, x.shape[2], step):
        variance[:, :, start : start + step] = (
            x[:, :, start : start + step].float().pow(2).mean(1, keepdim=True)
        )
    # In place or not, the product is computed in float32 and stored in x's dtype: the same values.
    return torch.mul(x, variance.add_(eps).rsqrt_(), out=x if inplace else torch.empty_like(x))


class Conv3d(nn.Module):
    """Conv3d, zero padded in space and replicate padded in time (non-causal: the edge frame repeats)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int]):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.pad_t = (kt - 1) // 2
        self.pointwise = (kt, kh, kw) == (1, 1, 1)
        self.conv = nn.Conv3d(cin, cout, (kt, kh, kw), padding=(0, kh // 2, kw // 2))

    def forward(
        self, x: torch.Tensor, overwrite_input: bool = False, prepare: Prepare | None = None
    ) -> torch.Tensor:
        """``overwrite_input``: x is a temporary the caller drops; a frame-chunked conv of the same output
        shape may write its result into x's memory (one 4.8 GB activation less at 1080p). ``prepare``: a
        per-position, in-place function (norm, activation) of the conv's input, applied to x's copy, or to
        each chunk of a frame-chunked conv, so no prepared copy of the whole of x is made."""
        if self.pointwise:
            return pointwise_conv3d(x, self.conv.weight, self.conv.bias)
        frames_out = x.shape[2] + 2 * self.pad_t - self.conv.kernel_size[0] + 1
        out_elements = x[:, :1, :1].numel() * self.conv.out_channels * frames_out
        if max(x.numel(), out_elements) > CONV_SPLIT_ELEMENTS:
            return self.forward_in_frame_chunks(x, CONV_CHUNK_ELEMENTS, overwrite_input, prepare)
        if prepare is not None:
            x = prepare(x.clone())
        if self.pad_t:
            first, last = x[:, :, :1], x[:, :, -1:]
            x = torch.cat(
                [first.expand(-1, -1, self.pad_t, -1, -1), x, last.expand(-1, -1, self.pad_t, -1, -1)], 2
            )
        return self.conv(x)

    def forward_in_frame_chunks(
        self,
        x: torch.Tensor,
        chunk_elements: int,
        overwrite_input: bool = False,
        prepare: Prepare | None = None,
    ) -> torch.Tensor:
        """The same convolution, a few output frames at a time. The conv pads nothing in time, so output
        frame t reads only (padded) input frames t .. t+kt-1: each chunk computes the very sums of the whole.
        A chunk's input is gathered with its replicate padding in one copy (no padded whole activation).
        With ``overwrite_input`` (and an output of x's shape) chunk outputs go into x: later chunks read
        input frames from stop - pad_t on, so those are saved before each write (the halo)."""
        b, _, t, h, w = x.shape
        kt, pad = self.conv.kernel_size[0], self.pad_t
        frames_out = t + 2 * pad - kt + 1
        per_frame_in, per_frame_out = b * x.shape[1] * h * w, b * self.conv.out_channels * h * w
        step = max(1, min(chunk_elements // per_frame_out, chunk_elements // per_frame_in - (kt - 1)))
        in_place = overwrite_input and (self.conv.out_channels, frames_out) == (x.shape[1], t) and step >= pad
        out = x if in_place else x.new_empty(b, self.conv.out_channels, frames_out, h, w)
        halo = None  # input frames start - pad .. start - 1, saved before the previous chunk overwrote them
        for start in range(0, frames_out, step):
            stop = min(start + step, frames_out)
            # padded frame i is input frame clamp(i - pad_t, 0, t-1): the edge frame repeats
            index = torch.arange(start, stop + kt - 1, device=x.device).sub_(pad).clamp_(0, t - 1)
            chunk = x.index_select(2, index)
            if halo is not None:
                chunk[:, :, :pad] = halo
            if prepare is not None:
                chunk = prepare(chunk)  # per position: the padded frames are prepared copies of edge frames
            result = self.conv(chunk)
            del chunk
            if in_place and pad:
                halo = x[:, :, stop - pad : stop].clone()
            out[:, :, start:stop] = result
        return out


class ResBlock(nn.Module):
    """norm → act → conv → norm → SiLU → conv, plus a (normalised) 1x1x1 shortcut when the width changes. The
    first activation is ReLU in blocks right after an upsampler, SiLU elsewhere."""

    def __init__(self, cin: int, cout: int, eps: float, relu_first: bool = False):
        super().__init__()
        self.first_act = F.relu if relu_first else F.silu
        self.eps = eps
        self.conv1 = Conv3d(cin, cout, 3)
        self.conv2 = Conv3d(cout, cout, 3)
        self.conv_shortcut = Conv3d(cin, cout, 1) if cin != cout else None

    def prepare_first(self, x: torch.Tensor) -> torch.Tensor:
        """The first norm and activation, in place (conv1 applies it to copies: x is still needed)."""
        return self.first_act(rms_channels(x, 1e-8, inplace=True), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At 1080p each [1, 128, 36, 544, 960] activation is 4.8 GB: conv1 normalises and activates its
        # input chunk by chunk, conv2 runs in place over h, the shortcut is added chunk by chunk: only x and h
        # live, plus chunks.
        h = self.conv1(x, prepare=self.prepare_first)
        h = self.conv2(F.silu(rms_channels(h, 1e-8, inplace=True), inplace=True), overwrite_input=True)
        if self.conv_shortcut is None:
            return h.add_(x)
        # The normalised 1x1x1 shortcut a few frames at a time, added into h: the norm and the conv act per
        # position, so chunks give the same values, and no whole normalised copy of x (4.8 GB) nor whole
        # shortcut output (2.4 GB) is made at 1080p.
        step = max(1, CHUNK_ELEMENTS // max(1, x[:, :, :1].numel()))
        for start in range(0, x.shape[2], step):
            h[:, :, start : start + step] += self.conv_shortcut(
                rms_channels(x[:, :, start : start + step], self.eps)
            )
        return h


class NearestUp2x(nn.Module):
    """2x nearest-exact spatial upsampling of [N, C, H, W] in x's dtype (nearest copies values: the same
    result as in float32), in batches of frames of at most CHUNK_ELEMENTS output elements each."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out = x.new_empty(n, c, 2 * h, 2 * w)  # [N, C, 2H, 2W]
        step = max(1, CHUNK_ELEMENTS // max(1, 4 * c * h * w))
        for start in range(0, n, step):
            out[start : start + step] = F.interpolate(
                x[start : start + step], scale_factor=2.0, mode="nearest-exact"
            )
        return out


class Upsample(nn.Module):
    """Spatial 2x per frame; with ``temporal``, first 2x in time by a (3,1,1) conv whose two channel halves
    become two frames (the very first frame of a clip is causal: dropped)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.time_conv = Conv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.resample = nn.Sequential(NearestUp2x(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None:
            x = self.time_conv(x).view(b, 2, c, t, h, w)  # channel = half·C + c
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame = 2t + half
            if first_chunk:
                x = x[:, :, 1:]
        t = x.shape[2]
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B·T, C, H, W]
        frames = self.resample(frames)  # [B·T, C, 2H, 2W]
        return frames.view(b, t, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, eps: float, scale: bool, spatial_only: bool):
        super().__init__()
        self.conv_in = ResBlock(cin, cout, eps) if cin != cout else None
        self.upsamplers = nn.ModuleList([Upsample(cout, temporal=not spatial_only)]) if scale else None
        self.resnets = nn.ModuleList(ResBlock(cout, cout, eps, relu_first=scale) for _ in range(layers))

    def steps(self, first_chunk: bool) -> list:
        """The block as a sequence of one-input callables: a caller that runs them in turn holds only the
        current activation (a caller of ``forward`` keeps the block's input alive to the end: 2.2 GB at
        1080p)."""
        steps = [] if self.conv_in is None else [self.conv_in]
        if self.upsamplers is not None:
            steps.append(functools.partial(self.upsamplers[0], first_chunk=first_chunk))
        return [*steps, *self.resnets]

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        for step in self.steps(first_chunk):
            x = step(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, layers: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(channels, channels, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


@dataclass(frozen=True)
class TurboConfig:
    """The fields of ``TurboV3-Wan22-TinyShallow_7_7.json`` this decoder uses (others must be neutral)."""

    latent_channels: int = 48
    block_out_channels: tuple[int, ...] = (64, 128, 256, 512)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3)
    spatio_temporal_scaling: tuple[bool, ...] = (False, True, True, True)
    spatio_only: tuple[bool, ...] = (False, True, False, False)
    out_channels: int = 3
    patch_size: int = 2
    eps: float = 1e-6
    first_chunk_size: int = 7
    step_size: int = 7
    temporal_compression: int = 4

    @classmethod
    def from_json(cls, path: str | Path) -> "TurboConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: cannot read the Turbo VAE config ({e})") from None
        _check_keys(path, raw)
        unsupported = {
            "decoder_is_dw_conv": any(raw.get("decoder_is_dw_conv", [])),
            "decoder_causal": raw.get("decoder_causal", False),
            "use_unpatchify": not raw.get("use_unpatchify", False),
            "patch_size_t": raw.get("patch_size_t", 1) != 1,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise CheckpointError(f"{path}: unsupported Turbo VAE options {bad} (only the TurboV3 layout is)")
        return cls(
            latent_channels=raw["latent_channels"],
            block_out_channels=tuple(raw["decoder_block_out_channels"]),
            layers_per_block=tuple(raw["decoder_layers_per_block"]),
            spatio_temporal_scaling=tuple(raw["decoder_spatio_temporal_scaling"]),
            spatio_only=tuple(raw["decoder_spatio_only"]),
            out_channels=raw.get("out_channels", 3),
            patch_size=raw.get("patch_size", 2),
            eps=raw.get("resnet_norm_eps", 1e-6),
            first_chunk_size=raw.get("first_chunk_size", 7),
            step_size=raw.get("step_size", 7),
            temporal_compression=raw.get("temporal_compression_ratio", 4),
        )


class Decoder3d(nn.Module):
    def __init__(self, c: TurboConfig):
        super().__init__()
        widths = c.block_out_channels[::-1]  # the config lists them encoder-first
        layers, scaling, spatial = (
            c.layers_per_block[::-1],
            c.spatio_temporal_scaling[::-1],
            c.spatio_only[::-1],
        )
        self.patch_size = c.patch_size
        self.conv_in = Conv3d(c.latent_channels, widths[0], 3)
        self.mid_block = MidBlock(widths[0], layers[0], c.eps)
        self.up_blocks = nn.ModuleList(
            UpBlock(cin, cout, layers[i + 1], c.eps, scaling[i], spatial[i])
            for i, (cin, cout) in enumerate(zip((widths[0],) + widths[:-1], widths, strict=True))
        )
        self.conv_out = Conv3d(widths[-1], c.out_channels * c.patch_size**2, 3)

    def forward(self, z: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for step in [step for block in self.up_blocks for step in block.steps(first_chunk)]:
            x = step(x)
        x = self.conv_out(F.silu(rms_channels(x, 1e-8)))  # [B, C·p·p, T, H, W]
        b, cpp, t, h, w = x.shape
        p = self.patch_size
        # channel index = c·p² + w_offset·p + h_offset (the Wan unpatchify convention)
        x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
        return x.reshape(b, cpp // (p * p), t, h * p, w * p)


# The keys from_json reads without a default: an int and four per-block lists.
REQUIRED_KEYS = {"latent_channels": int, "decoder_block_out_channels": list, "decoder_layers_per_block": list,
                 "decoder_spatio_temporal_scaling": list, "decoder_spatio_only": list}  # fmt: skip


def _check_keys(path: Path, raw) -> None:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: a Turbo VAE config is a JSON object, found {type(raw).__name__}")
    for key, kind in REQUIRED_KEYS.items():
        if key not in raw:
            raise CheckpointError(
                f"{path}: the Turbo VAE config has no '{key}' (TurboV3-Wan22-TinyShallow_7_7.json from "
                "GAIR/daVinci-MagiHuman has it); re-download the turbo_vae/ folder"
            )
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            kind_name = "integer" if kind is int else "list"
            raise CheckpointError(f"{path}: '{key}' must be a JSON {kind_name}, found {raw[key]!r:.60}")


class TurboVAEDecoder(nn.Module):
    """``decode(latent [1,48,F,h,w]) -> video [1,3,4F−3,16h,16w]`` in [−1, 1] (not clamped)."""

    def __init__(self, config: TurboConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    def decode(self, latent: torch.Tensor, offload_to: torch.device | str | None = None) -> torch.Tensor:
        """The whole clip from :meth:`stream`; ``offload_to`` collects finished windows there (e.g. "cpu"
        at 1080p to bound GPU memory)."""
        keep = (lambda x: x) if offload_to is None else (lambda x: x.to(offload_to))
        return torch.cat([keep(piece) for piece in self.stream(latent)], dim=2)

    def stream(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Sliding-window decode, one window's new pixel frames [1, 3, t, H, W] at a time (so a caller can
        write a clip of any length in flat memory): the first window is 7 latent frames plus one of right
        context, later ones 7 frames plus one of context on each side; the 4 pixel frames of each context
        latent are cut. The clip is padded with its last frame to 7 + 7n latents first and the padding's
        frames are cut from the last window."""
        c = self.config
        z = denormalize(latent.to(self.decoder.conv_in.conv.weight.device, self.dtype))
        frames = z.shape[2]
        pad = max(c.first_chunk_size - frames, 0)
        if frames > c.first_chunk_size:
            pad = -(frames - c.first_chunk_size) % c.step_size
        if pad:
            z = torch.cat([z, z[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        total, overlap = frames + pad, c.temporal_compression
        cut = pad * c.temporal_compression  # pixel frames of the padding, all in the last window
        if total == c.first_chunk_size:
            out = self.decoder(z, first_chunk=True)
            yield out[:, :, : out.shape[2] - cut]
            return
        yield self.decoder(z[:, :, : c.first_chunk_size + 1], first_chunk=True)[:, :, :-overlap]
        for start in range(c.first_chunk_size, total, c.step_size):
            last = start + c.step_size == total
            window = z[:, :, start - 1 : start + c.step_size + (0 if last else 1)]
            out = self.decoder(window, first_chunk=False)
            yield out[:, :, overlap : out.shape[2] - cut] if last else out[:, :, overlap:-overlap]


def turbo_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The decoder weights of a Turbo VAE checkpoint: ``ema_state_dict`` of the official ``.ckpt`` (read
    safely), or a ``.safetensors`` with the same keys; ``module.`` prefixes are dropped and a missing
    ``decoder.`` prefix added. The training-only feature-alignment heads are left out."""
    if path.suffix == ".safetensors":
        ckpt = Checkpoint(path)
        state = {key: ckpt.load(key) for key in ckpt.keys()}
    else:
        raw = load_torch_file(path)
        if not isinstance(raw, dict) or "ema_state_dict" not in raw:
            found = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{path}: no 'ema_state_dict' in this checkpoint (found {found})")
        state = raw["ema_state_dict"]
    state = {key.removeprefix("module."): tensor for key, tensor in state.items()}
    state = {key if key.startswith("decoder.") else "decoder." + key: tensor for key, tensor in state.items()}
    return {key: tensor for key, tensor in state.items() if not key.startswith("decoder.aligned_")}


def turbo_files(folder: str | Path) -> tuple[Path, Path]:
    """(JSON config, weights) in a Turbo VAE folder such as the published ``turbo_vae/``; a converted
    ``.safetensors`` is preferred over the ``.ckpt``."""
    folder = Path(folder)
    configs = sorted(folder.glob("*.json"))
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.ckpt"))
    if len(configs) != 1 or len(weights) != 1:
        raise CheckpointError(
            f"{folder}: a Turbo VAE folder holds one .json config and one .ckpt (or .safetensors) file, e.g. "
            f"TurboV3-Wan22-TinyShallow_7_7.json and checkpoint-340000.ckpt; found "
            f"{[p.name for p in configs + weights] or 'neither'}"
        )
    return configs[0], weights[0]


def load_turbo_vae(
    config_path: str | Path,
    weights_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> TurboVAEDecoder:
    """Build the decoder from its JSON and load its weights strictly (names the first missing or unexpected
    key)."""
    weights_path = Path(weights_path)
    config = TurboConfig.from_json(config_path)
    try:
        model = TurboVAEDecoder(config).to(device="meta")
    except (IndexError, TypeError, RuntimeError) as e:  # e.g. per-block lists of different lengths
        raise CheckpointError(
            f"{config_path}: this Turbo VAE config describes no valid decoder ({e})"
        ) from None
    what = f"the Turbo VAE described by {Path(config_path).name}"
    return assign_weights(model, turbo_state_dict(weights_path), weights_path, what, device, dtype)
