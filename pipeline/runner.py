"""A whole generation without ComfyUI (``python cli.py generate`` and ``demo``): find the models, load each
when its stage comes and release it after, run the same stage functions as the nodes, write mp4 and wav."""

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..fp8.checkpoint import CheckpointError
from .codecs.audio_vae import load_audio_vae
from .codecs.text_encoder import NEGATIVE_PROMPT, choose_precision, load_text_encoder
from .codecs.turbo_vae import load_turbo_vae, turbo_files
from .codecs.wan_vae import load_wan_vae
from .dit.device_memory import INFERENCE_RESERVE_BYTES, dit_tokens, held_by_others, swap_layers_for
from .dit.fusion import AUTO, fuse
from .dit.loading import load_dit
from .dit.parallel import ParallelPlan
from .media.files import write_mp4, write_wav
from .media.outputs import staged_outputs
from .precision import vae_dtype
from .preflight import check_run
from .sampling.long_clips import generate_long, generate_long_sr
from .sampling.loops import Hooks
from .sampling.requests import BaseRequest, SRRequest
from .sampling.sizes import ClipSize, clip_size
from .sampling.stages import decode_stream, driving_audio, reference_latent
from .sampling.windows import DEFAULT_WINDOWS, WindowSettings
from .weights.catalogue import MODEL_FILES, missing_file_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPaths:
    """Where each model is. ``from_models_dir`` fills them from a ComfyUI models folder."""

    dit: Path
    text_encoder: Path
    audio_vae: Path
    turbo_vae: Path | None = None
    wan_vae: Path | None = None
    sr_dit: Path | None = None

    @classmethod
    def from_models_dir(
        cls, models_dir: Path, mode: str, sr: str | None, **given: Path | None
    ) -> "ModelPaths":
        names = {
            "dit": f"dit_{mode}",
            "text_encoder": "text_encoder",
            "audio_vae": "audio_vae",
            "turbo_vae": "turbo_vae",
            "wan_vae": "wan_vae",
            "sr_dit": f"dit_sr_{sr}" if sr else None,
        }
        paths = {}
        for field, name in names.items():
            if given.get(field) is not None:
                paths[field] = Path(given[field])
            elif name is not None:
                entry = MODEL_FILES[name]
                candidate = models_dir / entry.folder / entry.path.rstrip("/")
                paths[field] = candidate if candidate.exists() else None
        for field in ("dit", "text_encoder", "audio_vae") + (("sr_dit",) if sr else ()):
            if paths.get(field) is None:
                folder = models_dir / MODEL_FILES[names[field]].folder
                raise CheckpointError(missing_file_message(names[field], [str(folder)]))
        return cls(**paths)


@dataclass(frozen=True)
class Request:
    prompt: str
    seconds: float = 4.0
    width: int = 448
    height: int = 256
    mode: str = "distill"
    seed: int = 42
    steps: int | None = None
    negative: str = NEGATIVE_PROMPT
    sr_size: tuple[int, int] | None = None
    image: Path | None = None
    audio: Path | None = None
    decoder: str = "turbo"  # turbo, wan or both
    compute: str = "auto"
    swap_layers: int | None = 0  # None: the fewest each DiT stage needs on this GPU (none on the CPU)
    parallel: ParallelPlan | None = None  # torchrun: every rank runs the DiT stages, rank 0 writes the files
    windows: WindowSettings = DEFAULT_WINDOWS  # clips longer than one window are made window by window
    window_prompts: tuple[str, ...] = ()  # one prompt per window (the last serves the rest); () = prompt


Progress = Callable[[str, int, int], None]


def _free(*models) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _available_memory(device: str) -> int | None:
    """Bytes the stages may use on a CUDA device (its total less the usual reserve and what other programs
    hold now); None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return total - INFERENCE_RESERVE_BYTES - held_by_others(device)


def run(
    paths: ModelPaths,
    request: Request,
    output: Path,
    device: str = "cpu",
    progress: Progress | None = None,
    overwrite: bool = False,
):
    """Generate one clip; returns the files written (``<output>.mp4``, ``<output>.wav``, and
    ``<output>_wan.mp4`` when both decoders are asked for; see :func:`~.media.outputs.clip_outputs`).
    Every input, path and output is checked before the first model loads; existing files are kept unless
    ``overwrite``. With ``request.parallel`` every rank of the group calls this with the same request: they
    sample together, and only rank 0 decodes and writes (the others return no files)."""
    checked = check_run(paths, request, output, overwrite)
    size = checked.size
    if request.decoder in ("wan", "both") or request.image is not None:
        if paths.wan_vae is None:
            raise CheckpointError(missing_file_message("wan_vae", []))
    if request.decoder in ("turbo", "both") and paths.turbo_vae is None:
        raise CheckpointError(missing_file_message("turbo_vae", []))

    plan = request.parallel
    lead = plan is None or plan.rank == 0
    progress = progress if lead else None

    def hooks(stage: str) -> Hooks:
        if not progress:
            return Hooks()
        label = [stage]  # "<stage> [window i/n]" while a long clip's windows run

        def on_window(index: int, count: int) -> None:
            label[0] = f"{stage} [window {index}/{count}]"

        return Hooks(on_step=lambda i, n, *_: progress(label[0], i, n), on_window=on_window)

    def done(stage: str) -> None:  # one-step stages (loading, encoding, decoding)
        if progress:
            progress(stage, 1, 1)

    available = _available_memory(device)
    fp8, on_device = (False, True) if available is None else choose_precision(paths.text_encoder, available)
    encoder = load_text_encoder(paths.text_encoder, device if on_device else "cpu", fp8=fp8)
    text = encoder.encode(request.prompt)
    prompts = tuple(encoder.encode(line) for line in request.window_prompts)
    negative = encoder.encode(request.negative) if request.mode == "base" or request.sr_size else None
    _free(encoder)
    done("text encoding")

    dtype = vae_dtype(device)
    wan = (
        load_wan_vae(paths.wan_vae, device, dtype)
        if paths.wan_vae is not None and request.image is not None
        else None
    )
    image = checked.image
    image_latent = None if image is None else reference_latent(wan, image, size.width, size.height)
    audio_vae = load_audio_vae(paths.audio_vae, device)
    sound = None if checked.audio is None else driving_audio(audio_vae, checked.audio, size, request.windows)

    def dit_for(path: Path, variant: str | None, stage: ClipSize):  # both DiT stages load alike
        swap = request.swap_layers
        if swap is None and available is None:
            swap = 0  # auto off a GPU: the weights are in system memory anyway
        elif swap is None:  # auto: the fewest layers for one window of this stage's size
            frames = min(stage.latent_frames, request.windows.latent_frames)
            tokens = dit_tokens(frames, stage.latent_height, stage.latent_width)
            swap = swap_layers_for(path, variant, request.compute, tokens, available)
            log.info("swap layers (auto) for %s: %d", path, swap)
        model, _ = load_dit(path, variant=variant, compute=request.compute, device=device, swap_layers=swap)
        fuse(model, AUTO, device)  # compiled elementwise kernels where Triton works
        return model

    dit = dit_for(paths.dit, checked.dit_variant, size)
    base = BaseRequest(
        size=size, text=text, seed=request.seed, negative=negative, image_latent=image_latent,
        hooks=hooks(f"{request.mode} sampling"), device=device, mode=request.mode, steps=request.steps,
        audio=sound, parallel=plan, windows=request.windows, prompts=prompts,
    )  # fmt: skip
    latent = generate_long(dit, base).check_finite(f"{request.mode} sampling", str(paths.dit))
    _free(dit)
    if request.sr_size is not None:
        sr_size = clip_size(latent.seconds, *request.sr_size)
        sr_dit = dit_for(paths.sr_dit, checked.sr_variant, sr_size)
        sr_image = None if image is None else reference_latent(wan, image, sr_size.width, sr_size.height)
        sr = SRRequest(
            size=sr_size, text=text, seed=request.seed, image_latent=sr_image,
            hooks=hooks("super-resolution"), device=device, windows=request.windows,
            parallel=None if plan is None else replace(plan, cfg=False),  # SR: the long sequence splits
        )  # fmt: skip
        latent = generate_long_sr(sr_dit, latent, sr).check_finite("super-resolution", str(paths.sr_dit))
        _free(sr_dit)

    if not lead:
        return []
    decoders = {"turbo": ["turbo"], "wan": ["wan"], "both": ["turbo", "wan"]}[request.decoder]
    with staged_outputs(checked.outputs, overwrite) as staged:  # all files of the clip appear together
        for name in decoders:
            if name == "turbo":
                decoder = load_turbo_vae(*turbo_files(paths.turbo_vae), device=device, dtype=dtype)
            else:
                decoder = wan or load_wan_vae(paths.wan_vae, device, dtype)
            frames, audio = decode_stream(latent, decoder, audio_vae)  # decoded while the mp4 is written
            first = name == decoders[0]
            write_mp4(staged["mp4" if first else name], frames, audio)
            done(f"decoding ({name})")
            if first:
                write_wav(staged["wav"], audio)
            _free(decoder)
    return list(checked.outputs.values())
