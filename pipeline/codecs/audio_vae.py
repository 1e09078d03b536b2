"""The Stable Audio Open "Oobleck" VAE: stereo waveform <-> 64-channel latents at a 2048x hop. MagiHuman uses
one latent per video frame (25 Hz), so the VAE runs at a nominal 51.2 kHz. Module names follow the
checkpoint keys (``decoder.layers.1.layers.0.beta``, ...), with weight norm folded into plain weights."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...fp8.checkpoint import Checkpoint, CheckpointError
from ..weights.torch_files import assign_weights

HOP = 2048
SAMPLE_RATE = 25 * HOP  # 51.2 kHz: one latent per 25 fps video frame
FULL_CHECKPOINT_PREFIX = "pretransform.model."  # the VAE inside stable-audio-open-1.0/model.safetensors
WEIGHT_NORM_NAMES = (  # (g, v) of torch.nn.utils.weight_norm and of its parametrization (ComfyUI's files)
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


class SnakeBeta(nn.Module):
    """x + 1/β · sin²(α·x), with α and β stored as logarithms, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha.exp()[None, :, None], self.beta.exp()[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(channels),
            nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class Layers(nn.Module):
    """A ``layers`` sequence (the checkpoint nests every block's modules under that name)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def encoder_block(cin: int, cout: int, stride: int) -> Layers:
    return Layers(
        *(ResidualUnit(cin, d) for d in (1, 3, 9)),
        SnakeBeta(cin),
        nn.Conv1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
    )


def decoder_block(cin: int, cout: int, stride: int) -> Layers:
    return Layers(
        SnakeBeta(cin),
        nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        *(ResidualUnit(cout, d) for d in (1, 3, 9)),
    )


@dataclass(frozen=True)
class OobleckConfig:
    """Stable Audio Open's pretransform: channels 128, multipliers 1-2-4-8-16, strides 2-4-4-8-8."""

    channels: int = 128
    c_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    strides: tuple[int, ...] = (2, 4, 4, 8, 8)
    latent_dim: int = 64
    io_channels: int = 2


class OobleckVAE(nn.Module):
    """``decode(latent [1,A,64]) -> waveform [1,2,2048·A]`` and ``encode(waveform [1,2,2048·A]) -> latent
    mean [1,A,64]`` (deterministic: the bottleneck's mean, no sampling); waveforms at 51.2 kHz."""

    def __init__(self, config: OobleckConfig | None = None):
        super().__init__()
        c = self.config = config or OobleckConfig()
        widths = [c.channels * m for m in (1, *c.c_mults)]
        self.encoder = Layers(
            nn.Conv1d(c.io_channels, widths[0], 7, padding=3),
            *(encoder_block(widths[i], widths[i + 1], s) for i, s in enumerate(c.strides)),
            SnakeBeta(widths[-1]),
            nn.Conv1d(widths[-1], 2 * c.latent_dim, 3, padding=1),  # mean ‖ scale
        )
        self.decoder = Layers(
            nn.Conv1d(c.latent_dim, widths[-1], 7, padding=3),
            *(decoder_block(widths[i + 1], widths[i], c.strides[i]) for i in reversed(range(len(c.strides)))),
            SnakeBeta(widths[0]),
            nn.Conv1d(widths[0], c.io_channels, 7, padding=3, bias=False),
        )

    @property
    def device(self) -> torch.device:
        return self.decoder.layers[0].weight.device

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = latent.to(self.device, torch.float32).transpose(1, 2)  # [1, 64, A]
        return self.decoder(x)  # [1, 2, 2048·A]

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(waveform.to(self.device, torch.float32))  # [1, 128, A]
        return moments.chunk(2, dim=1)[0].transpose(1, 2)  # mean [1, A, 64]


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-normed convolutions (``weight_g``/``weight_v``, or torch's parametrization names
    ``parametrizations.weight.original0/1``) -> plain ``weight`` = g·v/‖v‖ (norm over all but dim 0)."""
    folded = {}
    for key, tensor in state.items():
        for g_name, v_name in WEIGHT_NORM_NAMES:
            if key.endswith(g_name):
                module = key.removesuffix(g_name)
                v = state.get(module + v_name)
                if v is None:
                    raise CheckpointError(f"'{key}' has no matching '{module + v_name}'")
                folded[module + ".weight"] = torch._weight_norm(v.float(), tensor.float(), 0)
                break
            if key.endswith(v_name):
                break
        else:
            folded[key] = tensor
    return folded


def load_audio_vae(path: str | Path, device: torch.device | str = "cpu") -> OobleckVAE:
    """Load the audio VAE from the full ``stable-audio-open-1.0`` checkpoint (keys under
    ``pretransform.model.``; everything else in it is skipped) or from a VAE-only file (ComfyUI's layout).
    Widths are read from the weights."""
    path = Path(path)
    ckpt = Checkpoint(path)
    keys = ckpt.keys()
    if any(key.startswith(FULL_CHECKPOINT_PREFIX) for key in keys):
        keys = [key for key in keys if key.startswith(FULL_CHECKPOINT_PREFIX)]
    state = {key.removeprefix(FULL_CHECKPOINT_PREFIX): ckpt.load(key) for key in keys}
    if not any(key.startswith("decoder.layers.") for key in state):
        raise CheckpointError(
            f"{path}: not a Stable Audio Open VAE: no 'decoder.layers.*' or 'pretransform.model.decoder.*' "
            "tensors. Use stable-audio-open-1.0/model.safetensors or ComfyUI's stable audio VAE file."
        )
    try:
        state = fold_weight_norm(state)
        config = OobleckConfig(
            channels=state["encoder.layers.0.weight"].shape[0],
            latent_dim=state["decoder.layers.0.weight"].shape[1],
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: not a Stable Audio Open VAE: tensor {e} is missing") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = OobleckVAE(config).to(device="meta")
    return assign_weights(model, state, path, "a Stable Audio Open VAE", device, torch.float32)
