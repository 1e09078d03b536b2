"""Long clips: time and peak memory of a windowed generation (base stage, then the Turbo VAE decode and the
sound written into an mp4 window by window, as ``cli.py generate`` does) against the clip's length. Each
length runs in a fresh process, so the peak RSS of one is not carried into the next (on CPU the peak never
goes down). The model is the demo's random DiT (4 layers of width 256, bf16 linears) at the official base
size with the demo's Turbo VAE: the machinery at a size where activations, not the interpreter, dominate;
speed and memory do not depend on the weights' values."""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.codecs.audio_vae import OobleckVAE
from ..pipeline.codecs.text_encoder import TextEmbedding
from ..pipeline.codecs.turbo_vae import TurboVAEDecoder
from ..pipeline.demo import AUDIO_CONFIG, TURBO_CONFIG, random_dit_state
from ..pipeline.dit.config import PRESETS
from ..pipeline.dit.model import MagiDiT
from ..pipeline.media.files import write_mp4
from ..pipeline.sampling.long_clips import generate_long
from ..pipeline.sampling.requests import BaseRequest
from ..pipeline.sampling.sizes import BASE_SIZE, clip_size
from ..pipeline.sampling.stages import decode_stream
from ..pipeline.sampling.windows import WindowSettings, plan_windows
from .device import describe_device, peak_gib

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LongClipResult:
    seconds: float
    windows: int
    latent_frames: int
    sample_s: float
    sample_peak_gib: float  # the peak up to the end of sampling: the windows' part
    decode_s: float
    peak_gib: float  # the peak with decoding into the mp4 (one decoder window of frames at a time)


def run_one(seconds: float, device: torch.device, steps: int, window: WindowSettings) -> LongClipResult:
    """One clip in this process: distilled sampling window by window, then decoding of video and sound
    streamed into an mp4 in a temporary folder."""
    config = PRESETS["demo"]
    dit = MagiDiT(config, device="meta")
    dit.load_state_dict(random_dit_state(config, torch.Generator().manual_seed(0), device), assign=True)
    torch.manual_seed(0)
    turbo = TurboVAEDecoder(TURBO_CONFIG).to(device).eval()
    audio_vae = OobleckVAE(AUDIO_CONFIG).to(device).eval()
    size = clip_size(seconds, *BASE_SIZE)
    text = TextEmbedding(torch.randn(1, 640, 3584).half(), 100)
    request = BaseRequest(size=size, text=text, device=device, steps=steps, windows=window)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        start = time.perf_counter()
        latent = generate_long(dit, request)
        sampled, sample_peak = time.perf_counter(), peak_gib(device)
        frames, sound = decode_stream(latent, turbo, audio_vae)
        with tempfile.TemporaryDirectory() as folder:
            write_mp4(Path(folder) / "clip.mp4", frames, sound)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
    windows = len(plan_windows(size, window))
    return LongClipResult(
        seconds, windows, size.latent_frames, sampled - start, sample_peak, done - sampled, peak_gib(device)
    )


def bench_long_clip(
    device: torch.device, lengths: list[float], steps: int, window: WindowSettings
) -> list[LongClipResult]:
    """Each length in its own Python process (see ``CHILD``)."""
    results = []
    for seconds in lengths:
        args = [str(ROOT), str(seconds), str(device), str(steps), str(window.seconds), str(window.overlap)]
        run = subprocess.run(
            [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            raise RuntimeError(f"the {seconds:g} s run failed:\n{run.stderr[-3000:]}")
        results.append(LongClipResult(**json.loads(run.stdout.strip().splitlines()[-1])))
    return results


# The child process: import the pack the way cli.py does, run one length, print its result as JSON.
CHILD = """
import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_bootstrap", sys.argv[1] + "/_bootstrap.py")
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.load()
import torch
from magihuman.benchmarks.long_clip import run_one
from magihuman.pipeline.sampling.windows import WindowSettings
seconds, device, steps, window_seconds, overlap = sys.argv[2:]
window = WindowSettings(float(window_seconds), int(overlap))
result = run_one(float(seconds), torch.device(device), int(steps), window)
print(json.dumps(dataclasses.asdict(result)))
"""


def format_long_clip_results(
    results: list[LongClipResult], device: torch.device, window: WindowSettings
) -> str:
    lines = [
        f"Long clips on {describe_device(device)}: demo DiT (random, 4 layers x 256), {BASE_SIZE[0]}x"
        f"{BASE_SIZE[1]}, {window.seconds:g} s windows overlapping by {window.overlap} latent frame(s)",
        "",
        f"{'seconds':>8}{'windows':>9}{'latents':>9}{'sample s':>10}{'s/window':>10}{'peak GiB':>10}"
        f"{'decode s':>10}{'peak GiB':>10}",
    ]
    for r in results:
        per_window = r.sample_s / r.windows
        lines.append(
            f"{r.seconds:>8g}{r.windows:>9}{r.latent_frames:>9}{r.sample_s:>10.1f}{per_window:>10.1f}"
            f"{r.sample_peak_gib:>10.2f}{r.decode_s:>10.1f}{r.peak_gib:>10.2f}"
        )
    lines.append("(first peak: up to the end of sampling; second: with decoding streamed into the mp4)")
    return "\n".join(lines)
