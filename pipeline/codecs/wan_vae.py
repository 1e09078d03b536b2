"""The Wan2.2 video VAE (z = 48; 16x spatial = 2x2 patchify x 8x convolutions; 4x temporal with a causal
first frame). Encodes reference images/clips to normalised latent means and decodes latents, running the
causal convolutions chunk by chunk with a feature cache scoped to one call. Module names are the keys of
``Wan2.2_VAE.pth`` (``encoder.downsamples.0.downsamples.0.residual.2.weight``, ...)."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...fp8.checkpoint import Checkpoint, CheckpointError
from ..weights.torch_files import assign_weights, load_torch_file
from .pointwise_conv import pointwise_conv3d
from .wan_stats import denormalize, normalize

CACHE_T = 2  # frames of history a k=3 causal conv needs


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (all temporal padding before the clip). With a ``cache`` (a dict
    scoped to one encode/decode call) the frames seen in earlier chunks replace that padding."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.pads = (pw, pw, ph, ph, 2 * pt)
        self.pointwise = self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and not any(self.pads)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.pointwise:
            return pointwise_conv3d(x, self.weight, self.bias)
        pw, _, ph, _, pt = self.pads
        if cache is not None and pt > 0:
            previous = cache.get(self)
            history = x[:, :, -CACHE_T:]
            if history.shape[2] < CACHE_T and previous is not None:
                history = torch.cat([previous[:, :, -1:], history], dim=2)
            cache[self] = history
            if previous is not None:
                x = torch.cat([previous, x], dim=2)
                pt -= previous.shape[2]
        return super().forward(F.pad(x, (pw, pw, ph, ph, pt, 0)))


class RMSNorm(nn.Module):
    """x / ‖x‖ over channels · √C · γ (γ per channel)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class FloatUpsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


def per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply a 2-D operation to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B·T, C', H', W']
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame, plus 2x temporal for the 3d modes (a causal stride-2 conv, or a
    conv whose channel halves become frame pairs). The first chunk of a clip passes time unchanged."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(FloatUpsample2x(), nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        x = per_frame(x, self.resample)
        if self.mode == "downsample3d":
            previous = cache.get(self)
            cache[self] = x[:, :, -1:] if previous is not None else x
            if previous is not None:
                x = self.time_conv(torch.cat([previous[:, :, -1:], x], dim=2))  # [B, C, T/2, H, W]
        return x

    def _double_time(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        previous = cache.get(self)
        if previous is None:  # first chunk: the causal first frame is not doubled
            cache[self] = "first"
            return x
        history = x[:, :, -CACHE_T:]
        if history.shape[2] < CACHE_T:
            before = torch.zeros_like(history) if isinstance(previous, str) else previous[:, :, -1:]
            history = torch.cat([before, history], dim=2)
        x = self.time_conv(x) if isinstance(previous, str) else self.time_conv(x, {self.time_conv: previous})
        cache[self] = history
        b, c2, t, h, w = x.shape
        x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
        return x.reshape(b, c2 // 2, 2 * t, h, w)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin),
            nn.SiLU(),
            CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; keeps the checkpoint's layer numbering
            CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        def attend(frames: torch.Tensor) -> torch.Tensor:
            n, c, h, w = frames.shape
            qkv = self.to_qkv(self.norm(frames)).view(n, 1, 3 * c, h * w).transpose(2, 3)  # [N, 1, HW, 3C]
            out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # [N, 1, HW, C]
            return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

        return x + per_frame(x, attend)


def space_to_channels(x: torch.Tensor, shortcut_channels: int, ft: int, fs: int) -> torch.Tensor:
    """AvgDown3D: fold ft×fs×fs neighbourhoods into channels, then average channel groups down."""
    x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, shortcut_channels, c * ft * fs * fs // shortcut_channels, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


def channels_to_space(
    x: torch.Tensor, out_channels: int, ft: int, fs: int, first_chunk: bool
) -> torch.Tensor:
    """DupUp3D: repeat channels, then unfold them into ft×fs×fs neighbourhoods."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_channels * ft * fs * fs // c, dim=1)
    x = x.view(b, out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_channels, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first_chunk else x


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.cout, self.ft, self.fs = cout, 2 if temporal else 1, 2 if down else 1
        layers = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(blocks)]
        if down:
            layers.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        shortcut = space_to_channels(x, self.cout, self.ft, self.fs)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.cout, self.ft, self.up = cout, 2 if temporal else 1, up
        layers = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(blocks)]
        if up:
            layers.append(Resample(cout, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        shortcut = channels_to_space(x, self.cout, self.ft, 2, first_chunk) if self.up else None
        for layer in self.upsamples:
            x = layer(x, cache)
        return x if shortcut is None else x + shortcut


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 160  # encoder width
    dec_dim: int = 256  # decoder width
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


class Encoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.dim * m for m in (1, *c.dim_mult)]
        last = len(c.dim_mult) - 1
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownBlock(
                    dims[i], dims[i + 1], c.num_res_blocks, i < last and c.temporal_downsample[i], i != last
                )
                for i in range(len(c.dim_mult))
            )
        )
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.dec_dim * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
        temporal_up = c.temporal_downsample[::-1]
        last = len(c.dim_mult) - 1
        self.conv1 = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        self.upsamples = nn.Sequential(
            *(
                UpBlock(dims[i], dims[i + 1], c.num_res_blocks + 1, i < last and temporal_up[i], i != last)
                for i in range(len(c.dim_mult))
            )
        )
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 12, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk)
        return self.head[2](self.head[1](self.head[0](x)), cache)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, 2H, 2W] -> [B, 4C, T, H, W]; channel = c·4 + w_offset·2 + h_offset."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, 4 * c, t, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, t, h, w = x.shape
    x = x.view(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c4 // 4, t, 2 * h, 2 * w)


class WanVAE(nn.Module):
    """``encode(video [1,3,T,H,W] in [−1,1]) -> normalised mean [1,48,(T−1)/4+1,H/16,W/16]`` (float32) and
    ``decode(latent) -> video [1,3,4F−3,16h,16w]`` clamped to [−1, 1]. Statistics run in the model dtype,
    as the official wrapper does once it is cast."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config = config or WanVAEConfig()
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = patchify(video.to(self.conv1.weight.device, self.dtype))
        cache: dict = {}  # causal history, scoped to this call
        chunks = [self.encoder(x[:, :, :1], cache)]  # the first frame alone, then groups of 4
        # As the official encoder: frames after the last whole group of 4 are not encoded.
        chunks += [
            self.encoder(x[:, :, i : i + 4], cache) for i in range(1, 1 + 4 * ((x.shape[2] - 1) // 4), 4)
        ]
        mu = self.conv1(torch.cat(chunks, dim=2)).chunk(2, dim=1)[0]
        return normalize(mu, self.dtype).float()

    def decode(self, latent: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """``tile``: decode in overlapping spatial tiles of that many latent cells (bounds 1080p memory)."""
        z = latent.to(self.conv1.weight.device, self.dtype)
        if tile is not None and max(z.shape[-2:]) > tile:
            return decode_tiled(self._decode, z, tile)
        return self._decode(z)

    def stream(self, latent: torch.Tensor, tile: int | None = None) -> Iterator[torch.Tensor]:
        """The decode in pieces [1, 3, t, H, W]: one latent frame's pixel frames at a time (the decoder is
        causal, carrying its cache from frame to frame), so a clip of any length is written in flat memory;
        tiled, the whole clip at once (its tiles span every frame)."""
        z = latent.to(self.conv1.weight.device, self.dtype)
        if tile is not None and max(z.shape[-2:]) > tile:
            yield decode_tiled(self._decode, z, tile)
            return
        x = self.conv2(denormalize(z, self.dtype))
        cache: dict = {}
        for i in range(x.shape[2]):
            frames = self.decoder(x[:, :, i : i + 1], cache, first_chunk=i == 0)
            yield unpatchify(frames).float().clamp_(-1, 1)  # [1, 3, 1 or 4, H, W]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.stream(z)), dim=2)


def decode_tiled(decode, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Decode spatial tiles of ``tile`` latent cells overlapping by a quarter tile; cross-fade the seams."""
    scale, overlap = 16, max(tile // 4, 1)
    _, _, f, h, w = z.shape
    out = torch.zeros(1, 3, 4 * f - 3, h * scale, w * scale, device=z.device)
    weight = torch.zeros(1, 1, 1, h * scale, w * scale, device=z.device)
    step = tile - overlap
    for top in range(0, max(h - overlap, 1), step):
        for left in range(0, max(w - overlap, 1), step):
            t0, l0 = min(top, max(h - tile, 0)), min(left, max(w - tile, 0))
            piece = decode(z[:, :, :, t0 : t0 + tile, l0 : l0 + tile])
            ph, pw = piece.shape[-2:]
            ramp_h = _ramp(ph, overlap * scale, t0 > 0, t0 + tile < h, z.device)
            ramp_w = _ramp(pw, overlap * scale, l0 > 0, l0 + tile < w, z.device)
            mask = ramp_h.view(1, 1, 1, -1, 1) * ramp_w.view(1, 1, 1, 1, -1)
            out[..., t0 * scale : t0 * scale + ph, l0 * scale : l0 * scale + pw] += piece * mask
            weight[..., t0 * scale : t0 * scale + ph, l0 * scale : l0 * scale + pw] += mask
    return out / weight


def _ramp(size: int, fade: int, fade_in: bool, fade_out: bool, device) -> torch.Tensor:
    ramp = torch.ones(size, device=device)
    steps = torch.linspace(0, 1, fade + 2, device=device)[1:-1]
    if fade_in:
        ramp[:fade] = steps
    if fade_out:
        ramp[-fade:] = steps.flip(0)
    return ramp


def wan_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``Wan2.2_VAE.pth`` (read safely) or ComfyUI's repackaged ``wan2.2_vae.safetensors``: same keys."""
    if path.suffix == ".safetensors":
        ckpt = Checkpoint(path)
        return {key: ckpt.load(key) for key in ckpt.keys()}
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def config_from_shapes(state: dict[str, torch.Tensor], source: Path) -> WanVAEConfig:
    """Widths read from the weights (the released VAE is dim 160 / dec_dim 256; test models are smaller)."""
    try:
        dim = state["encoder.conv1.weight"].shape[0]
        dec_dim = state["decoder.conv1.weight"].shape[0] // WanVAEConfig.dim_mult[-1]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a Wan2.2 VAE checkpoint: tensor {e} is missing") from None
    return WanVAEConfig(dim=dim, dec_dim=dec_dim, z_dim=z_dim)


def load_wan_vae(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> WanVAE:
    """Load the Wan2.2 VAE strictly (the error names the first missing/unexpected/mis-shaped key)."""
    path = Path(path)
    state = wan_state_dict(path)
    model = WanVAE(config_from_shapes(state, path)).to(device="meta")
    return assign_weights(model, state, path, "a Wan2.2 VAE checkpoint", device, dtype)
