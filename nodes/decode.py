"""The decode nodes: a MagiHuman latent to frames (IMAGE), sound (AUDIO, 44.1 kHz stereo) and a VIDEO that
goes straight into core SaveVideo; or, for long clips, to a VIDEO file written window by window, which never
holds the clip's frames."""

import os
import uuid
from fractions import Fraction

import folder_paths
from comfy_api.latest import InputImpl, Types, io

from ..fp8.errors import InputError
from ..pipeline.media.files import write_mp4
from ..pipeline.sampling.sizes import FPS
from ..pipeline.sampling.stages import decode, decode_stream
from .memory import decode_activations, module_bytes, on_device
from .types import AUDIO_VAE, LATENT, VIDEO_VAE


def decode_inputs() -> list:
    """The inputs both decode nodes share: the latent, the decoders and which video decoder runs."""
    return [
        LATENT.Input("latent", tooltip="From a MagiHuman sampler or super-resolution."),
        VIDEO_VAE.Input("vae", tooltip="From MagiHuman Video VAE Loader."),
        AUDIO_VAE.Input("audio_vae", tooltip="From MagiHuman Audio VAE Loader."),
        io.Combo.Input(
            "decoder",
            options=["turbo", "wan"],
            default="turbo",
            tooltip="turbo: the fast Turbo VAE decoder (official default); wan: the full Wan2.2 VAE "
            "decoder (slower, heavier).",
        ),
    ]


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanDecode",
            display_name="MagiHuman Decode",
            category="MagiHuman",
            description="Decodes a MagiHuman latent to video frames and stereo sound, plus a VIDEO (25 fps, "
            "with sound) for SaveVideo.",
            inputs=[
                *decode_inputs(),
                io.Boolean.Input(
                    "offload_frames",
                    default=False,
                    tooltip="Turbo: move each decoded window to system memory (bounds GPU memory at 1080p).",
                ),
                io.Int.Input(
                    "tile",
                    default=0,
                    min=0,
                    max=256,
                    tooltip="Wan: decode in spatial tiles of this many latent cells (0 = whole frames); "
                    "bounds GPU memory at 1080p, e.g. 32.",
                ),
            ],  # fmt: skip
            outputs=[
                io.Image.Output(display_name="frames"),
                io.Audio.Output(display_name="audio"),
                io.Video.Output(display_name="video"),
            ],
        )

    @classmethod
    def execute(cls, latent, vae, audio_vae, decoder, offload_frames, tile) -> io.NodeOutput:
        model = video_decoder(vae, decoder)
        options = {"offload_to": "cpu"} if decoder == "turbo" and offload_frames else {}
        if decoder == "wan" and tile:
            options = {"tile": tile}
        need = module_bytes(model) + decode_activations(decoder, latent.video.shape, offload_frames, tile)
        with on_device(model, need), on_device(audio_vae, module_bytes(audio_vae)):
            frames, sound = decode(latent, model, audio_vae, **options)
        video = InputImpl.VideoFromComponents(
            Types.VideoComponents(images=frames, audio=sound, frame_rate=Fraction(FPS))
        )
        return io.NodeOutput(frames, sound, video)


def video_decoder(vae, decoder: str):
    model = vae.turbo if decoder == "turbo" else vae.wan
    if model is None:
        raise InputError(f"the {decoder} decoder was not loaded: set it in the MagiHuman Video VAE Loader")
    return model


class DecodeToFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanDecodeToFile",
            display_name="MagiHuman Decode to Video File",
            category="MagiHuman",
            description="For long clips: decodes a MagiHuman latent window by window straight into an mp4 "
            "(H.264 + AAC, 25 fps) in ComfyUI's temp folder and gives it as a VIDEO for SaveVideo. Memory "
            "stays that of one decoder window at any length (MagiHuman Decode holds every frame as an "
            "IMAGE: 1.4 MB a frame at 448x256, 25 MB at 1080p).",
            inputs=decode_inputs(),
            outputs=[io.Video.Output(display_name="video"), io.Audio.Output(display_name="audio")],
        )

    @classmethod
    def execute(cls, latent, vae, audio_vae, decoder) -> io.NodeOutput:
        model = video_decoder(vae, decoder)
        path = os.path.join(folder_paths.get_temp_directory(), f"magihuman_{uuid.uuid4().hex[:12]}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Streamed, the device holds one Turbo window or one Wan latent frame's pictures at a time (the
        # estimate of a 2-latent clip: 5 pictures).
        shape = latent.video.shape
        one = shape if decoder == "turbo" else (*shape[:2], 2, *shape[3:])
        need = module_bytes(model) + decode_activations(decoder, one, offload_frames=True, tile=0)
        with on_device(model, need), on_device(audio_vae, module_bytes(audio_vae)):
            frames, sound = decode_stream(latent, model, audio_vae)
            write_mp4(path, frames, sound)  # the frames are decoded as the file is written
        return io.NodeOutput(InputImpl.VideoFromFile(path), sound)
