"""The pack's own socket types and the objects that travel on them. Our models never ride on core MODEL /
VAE / CLIP sockets, so they cannot be wired into core nodes that would not know them."""

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..pipeline.codecs.text_encoder import TextEmbedding, TextEncoder
from ..pipeline.codecs.turbo_vae import TurboVAEDecoder
from ..pipeline.codecs.wan_vae import WanVAE
from ..pipeline.workers import WorkerPool
from .memory import Managed

DIT = io.Custom("MAGIHUMAN_DIT")
VIDEO_VAE = io.Custom("MAGIHUMAN_VAE")
AUDIO_VAE = io.Custom("MAGIHUMAN_AUDIO_VAE")
TEXT_ENCODER = io.Custom("MAGIHUMAN_TEXT_ENCODER")
CONDITIONING = io.Custom("MAGIHUMAN_CONDITIONING")
LATENT = io.Custom("MAGIHUMAN_LATENT")


@dataclass(frozen=True)
class LoadedDiT:
    managed: Managed  # the MagiDiT, known to ComfyUI's memory manager
    variant: str
    description: str  # e.g. "distill_fp8/ (published FP8, Fp8Linear(auto))"
    workers: WorkerPool | None = None  # gpus > 1: the other devices' replicas, shut down with this object


@dataclass(frozen=True)
class VideoVAEs:
    """Kept in system memory; each visits the GPU only while it encodes or decodes."""

    turbo: TurboVAEDecoder | None  # the fast default decoder
    wan: WanVAE | None  # reference-image encoding, and the full-quality decoder


@dataclass(frozen=True)
class LoadedTextEncoder:
    encoder: TextEncoder
    run_on_gpu: bool  # False: encode on the CPU (slow, but no GPU memory at all)


@dataclass(frozen=True)
class MagiConditioning:
    prompt: TextEmbedding
    negative: TextEmbedding
    image: torch.Tensor | None  # IMAGE [B, H, W, 3]: the reference picture, encoded at each stage's size
    audio: dict | None  # AUDIO: driving audio the clip lip-syncs to
