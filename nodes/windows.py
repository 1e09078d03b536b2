"""The long-clip node: how the samplers and the SR node cut a clip longer than one window, and optional
per-window prompts (one line per window) so the dialogue can move on."""

import logging
from dataclasses import dataclass, replace

from comfy_api.latest import io

from ..fp8.errors import InputError
from ..pipeline.codecs.text_encoder import TextEmbedding
from ..pipeline.sampling.windows import DEFAULT_WINDOWS, WINDOW_STEP_SECONDS, WindowSettings
from .memory import module_bytes, on_device
from .types import TEXT_ENCODER, LoadedTextEncoder

log = logging.getLogger(__name__)

WINDOWS = io.Custom("MAGIHUMAN_WINDOWS")


@dataclass(frozen=True)
class LongClip:
    settings: WindowSettings
    prompts: tuple[TextEmbedding, ...]  # one per window, the last serving the rest; () = the main prompt

    def windows(self, reference: bool) -> WindowSettings:
        """The window settings for a clip with (``reference``) or without a reference image: ``anchor``
        here is the user's choice, which holds only where there is a reference image."""
        return replace(self.settings, anchor=self.settings.anchor and reference)


# By default a reference image conditions every window, not only the first.
DEFAULT_LONG_CLIP = LongClip(replace(DEFAULT_WINDOWS, anchor=True), ())


class LongClipWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanLongClipWindows",
            display_name="MagiHuman Long Clip Windows",
            category="MagiHuman/sampling",
            description="Window settings for clips longer than one window (samplers and SR make those "
            "window by window anyway, with the defaults below): each window starts from the previous one's "
            "last latent frames held clean, and with driving audio takes exactly its slice of it. Optional "
            "prompts, one line per window.",
            inputs=[
                io.Float.Input(
                    "window_seconds",
                    default=DEFAULT_WINDOWS.seconds,
                    min=WINDOW_STEP_SECONDS,
                    max=60.0,
                    step=WINDOW_STEP_SECONDS,
                    round=0.01,
                    tooltip="Window length, a multiple of 0.16 s (4.96 = the model's 5 s training "
                    "length; longer windows need more memory).",
                ),
                io.Int.Input(
                    "overlap",
                    default=DEFAULT_WINDOWS.overlap,
                    min=1,
                    max=64,
                    tooltip="Latent frames each window takes clean from the previous one (1 = one "
                    "shared picture frame; each more adds 4 frames of context).",
                ),
                io.String.Input(
                    "window_prompts",
                    multiline=True,
                    default="",
                    tooltip="Optional: one prompt per line, line n for window n (the last line "
                    "serves the windows after it). Empty = the conditioning's prompt throughout.",
                ),
                TEXT_ENCODER.Input(
                    "text_encoder",
                    optional=True,
                    tooltip="Needed with window prompts: From MagiHuman T5-Gemma Loader.",
                ),
                io.Boolean.Input(
                    "anchor_reference",
                    default=True,
                    optional=True,
                    tooltip="With a reference image: every window holds it clean in its first latent "
                    "slot, before the previous window's frames, so the identity stays the reference's "
                    "over the whole clip (windows then advance one latent frame less). Off: only the "
                    "first window sees it. No effect without a reference image.",
                ),
            ],  # fmt: skip
            outputs=[WINDOWS.Output(display_name="windows")],
        )

    @classmethod
    def execute(
        cls,
        window_seconds,
        overlap,
        window_prompts,
        text_encoder: LoadedTextEncoder | None = None,
        anchor_reference=True,
    ):
        settings = WindowSettings(round(window_seconds, 2), overlap, anchor_reference)
        lines = [line.strip() for line in window_prompts.splitlines() if line.strip()]
        if lines and text_encoder is None:
            raise InputError("window prompts need the text encoder: connect a MagiHuman T5-Gemma Loader")
        if not lines:
            return io.NodeOutput(LongClip(settings, ()))
        encoder = text_encoder.encoder
        if text_encoder.run_on_gpu:
            with on_device(encoder, module_bytes(encoder.model)):
                prompts = tuple(encoder.encode(line) for line in lines)
        else:
            prompts = tuple(encoder.encode(line) for line in lines)
        return io.NodeOutput(LongClip(settings, prompts))
