"""Video decode time and peak memory of a 5-second clip with the Turbo VAE and the Wan2.2 VAE: the real
architectures with random weights (speed does not depend on the values); on CPU a few latent frames only."""

import time
from dataclasses import dataclass

import torch

from ..pipeline.codecs.turbo_vae import TurboConfig, TurboVAEDecoder
from ..pipeline.codecs.wan_vae import WanVAE
from ..pipeline.precision import vae_dtype
from ..pipeline.sampling.sizes import BASE_SIZE, SR_TARGETS
from .device import describe_device, peak_gib

SIZES = {"256p": BASE_SIZE, **SR_TARGETS}
FULL_CLIP_LATENTS = 32  # 5 s at 25 fps: 126 frames -> 32 latent frames


@dataclass(frozen=True)
class DecodeResult:
    decoder: str
    size: str
    latent_frames: int
    seconds: float
    peak_gib: float


def bench_vae_decode(device: torch.device, sizes: list[str], latent_frames: int | None) -> list[DecodeResult]:
    frames = latent_frames or (FULL_CLIP_LATENTS if device.type == "cuda" else 2)
    dtype = vae_dtype(device)
    decoders = {
        "turbo": lambda: TurboVAEDecoder(TurboConfig()).to(device, dtype).eval(),
        "wan": lambda: WanVAE().to(device, dtype).eval(),
    }
    results = []
    for name, build in decoders.items():
        model = build()
        for size in sizes:
            width, height = SIZES[size]
            latent = torch.randn(1, 48, frames, height // 16, width // 16, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with torch.inference_mode():
                options = {"offload_to": "cpu"} if name == "turbo" and size == "1080p" else {}
                model.decode(latent, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            results.append(DecodeResult(name, size, frames, time.perf_counter() - start, peak_gib(device)))
        del model
    return results


def format_decode_results(results: list[DecodeResult], device: torch.device) -> str:
    lines = [
        f"Video decode on {describe_device(device)} ({results[0].latent_frames} latent frames = "
        f"{4 * results[0].latent_frames - 3} video frames per clip)",
        "",
        f"{'decoder':<8}{'size':<7}{'seconds':>9}{'peak GiB':>10}",
    ]
    lines += [f"{r.decoder:<8}{r.size:<7}{r.seconds:>9.2f}{r.peak_gib:>10.2f}" for r in results]
    return "\n".join(lines)
