"""Everything a headless run can check before the first model loads (seconds, against minutes of loading):
the device, the prompt, sizes, steps and seed, every model path and whether each DiT fits its slot, the
reference image and driving audio (read here, once, and only as much audio as the clip needs), and the
output files. A problem is an :class:`InputError` / :class:`OutputError` naming the argument and the file."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fp8.checkpoint import CheckpointError
from ..fp8.errors import InputError
from .dit.loading import detect_variant
from .media.files import read_audio, read_image
from .media.outputs import check_outputs, clip_outputs
from .sampling.sizes import FPS, ClipSize, check_steps, clip_size

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1  # torch.Generator seeds are unsigned 64-bit
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
AUDIO_MARGIN = (
    0.05  # seconds read past the clip (from_audio keeps 0.1 s more for the resampler: no second note)
)
FLAGS = {"dit": "--dit", "sr_dit": "--sr-dit", "text_encoder": "--text-encoder", "audio_vae": "--audio-vae",
         "turbo_vae": "--turbo-vae", "wan_vae": "--wan-vae"}  # fmt: skip


@dataclass(frozen=True)
class Checked:
    """What the checks found and read, for the run to use as it is."""

    size: ClipSize
    image: torch.Tensor | None  # IMAGE [1, H, W, 3]
    audio: dict | None  # AUDIO, at most the clip's length (plus a margin)
    dit_variant: str
    sr_variant: str | None
    outputs: dict[str, Path]  # clip_outputs(): "mp4", "wav" and "<decoder>" for an extra decoder


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``; checked to exist."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise InputError(f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {text}: no CUDA GPU is usable here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise InputError(
                f"--device {text}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {text}: Apple MPS is not available here; use --device cpu")
    return device


def check_prompt(prompt: str, what: str = "--prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(
            f"{what} is empty: describe the scene, the dialogue and the background sound (the model was "
            "trained on detailed 150-200 word prompts)"
        )
    return prompt


def check_seed(seed) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be a whole number from 0 to {MAX_SEED} (2^64 - 1), got {seed!r}")
    return seed


def slot_variant(path: Path, flag: str, slot: str, default: str) -> str:
    """The variant of the DiT at ``path`` for a base (``slot`` "base") or super-resolution ("sr") slot: read
    from its name, or ``default`` when the name does not tell; a DiT made for the other slot is refused."""
    if not Path(path).exists():
        raise InputError(f"{flag} {path}: no such file or folder")
    try:
        variant = detect_variant(path)
    except CheckpointError:
        return default  # a renamed checkpoint: the slot says what it is
    if variant.startswith("sr_") != (slot == "sr"):
        needed = "a super-resolution DiT (sr_540p or sr_1080p)" if slot == "sr" else "the distill or base DiT"
        raise InputError(f"{flag} {path} is the {variant} DiT, but this slot needs {needed}")
    if variant != default and slot == "base":
        log.warning("%s %s is the %s DiT, run here in %s mode", flag, path, variant, default)
    return variant


def check_request(request) -> tuple[ClipSize, ClipSize | None]:
    """The values of a runner ``Request`` (no file is touched): (base size, super-resolution size)."""
    check_prompt(request.prompt)
    check_seed(request.seed)
    size = clip_size(request.seconds, request.width, request.height)
    if request.steps is not None:
        check_steps(request.steps)
    if request.swap_layers is not None and request.swap_layers < 0:
        raise InputError(f"--swap-layers must be 0 or more, got {request.swap_layers}")
    if request.sr_size is None:
        return size, None
    try:
        return size, clip_size(request.seconds, *request.sr_size)
    except InputError as e:
        raise InputError(f"--sr {'x'.join(map(str, request.sr_size))}: {e}") from None


def check_run(paths, request, output: Path, overwrite: bool = False) -> Checked:
    """Check a runner request (``ModelPaths``, ``Request``) and its outputs; read the image and audio."""
    size, sr_size = check_request(request)
    for field, flag in FLAGS.items():
        path = getattr(paths, field)
        if path is not None and not Path(path).exists():
            raise InputError(f"{flag} {path}: no such file or folder")
    dit_variant = slot_variant(paths.dit, FLAGS["dit"], "base", request.mode)
    sr_variant = None
    if sr_size is not None:
        default = "sr_1080p" if max(sr_size.width, sr_size.height) > 1280 else "sr_540p"
        sr_variant = slot_variant(paths.sr_dit, FLAGS["sr_dit"], "sr", default)
    image = None if request.image is None else read_image(request.image)
    audio = None
    if request.audio is not None:
        audio = read_audio(request.audio, size.audio_frames / FPS + AUDIO_MARGIN)
    outputs = clip_outputs(output, ("wan",) if request.decoder == "both" else ())
    check_outputs(list(outputs.values()), overwrite)
    return Checked(size, image, audio, dit_variant, sr_variant, outputs)
