"""What one stage is asked to do, built once by a node or the command line and handed down whole: a new
option is a field here and one use in the stage, not a parameter threaded through every caller."""

from dataclasses import dataclass

import torch

from ..codecs.text_encoder import TextEmbedding
from ..dit.parallel import ParallelPlan
from .loops import NO_HOOKS, Guidance, Hooks
from .scheduler import DEFAULT_SHIFT
from .sizes import ClipSize
from .super_resolution import SRSettings
from .windows import DEFAULT_WINDOWS, WindowSettings

MODES = ("distill", "base")
DEFAULT_STEPS = {"distill": 8, "base": 32, "sr": 5}


@dataclass(frozen=True)
class StageRequest:
    """What every stage takes. ``size``: the clip the stage makes (for SR, the target size); ``negative``:
    the negative prompt's embedding (base guidance, SR guidance); ``image_latent`` [1, 48, 1, h, w]: the
    reference image encoded at ``size`` (with ``k`` frames: the clean first k latent frames, as a window of a
    long clip holds the previous window's last ones); ``batch_cfg``: guidance branches in one batched call;
    ``parallel``: the process group that runs the DiT together (None: this process alone); ``windows``: how a
    clip longer than one window is cut (see :mod:`.windows`)."""

    size: ClipSize
    text: TextEmbedding
    seed: int = 42
    negative: TextEmbedding | None = None
    image_latent: torch.Tensor | None = None
    hooks: Hooks = NO_HOOKS
    device: torch.device | str = "cpu"
    batch_cfg: bool = False
    parallel: ParallelPlan | None = None
    windows: WindowSettings = DEFAULT_WINDOWS

    def __post_init__(self):
        if self.windows.anchor and self.image_latent is None:
            raise ValueError(
                "windows anchored to the reference image need one: give the reference image, or cut the "
                "clip with anchor off"
            )


@dataclass(frozen=True)
class BaseRequest(StageRequest):
    """The first stage: ``mode`` "distill" (8 re-noising steps) or "base" (32 guided UniPC steps);
    ``steps`` None = the mode's official count; ``audio`` = (latent [1, A, 64], waveform [1, 2, N]) of
    driving audio, held clean (lip-sync to given sound); ``audio_prefix`` [1, m, 64]: clean first audio
    latents (a window's sound over the overlap); ``prompts``: one embedding per window of a long clip (the
    last one serves the windows after it; empty = ``text`` for every window)."""

    mode: str = "distill"
    steps: int | None = None
    shift: float = DEFAULT_SHIFT
    guidance: Guidance = Guidance()
    audio: tuple[torch.Tensor, torch.Tensor] | None = None
    audio_prefix: torch.Tensor | None = None
    prompts: tuple[TextEmbedding, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "base" and self.negative is None:
            raise ValueError("the base model's guidance needs the negative prompt's embedding")


@dataclass(frozen=True)
class SRRequest(StageRequest):
    """Super-resolution of a base latent to ``size`` (same length as the latent)."""

    settings: SRSettings = SRSettings()
