"""The decode node: a MagiHuman latent to frames (IMAGE), sound (AUDIO, 44.1 kHz stereo) and a VIDEO that
goes straight into core SaveVideo."""

from fractions import Fraction

from comfy_api.latest import InputImpl, Types, io

from ..fp8.errors import InputError
from ..pipeline.sampling.sizes import FPS
from ..pipeline.sampling.stages import decode
from .memory import decode_activations, module_bytes, on_device
from .types import AUDIO_VAE, LATENT, VIDEO_VAE


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
                LATENT.Input("latent", tooltip="From a MagiHuman sampler or super-resolution."),
                VIDEO_VAE.Input("vae", tooltip="From MagiHuman Video VAE Loader."),
                AUDIO_VAE.Input("audio_vae", tooltip="From MagiHuman Audio VAE Loader."),
                io.Combo.Input(
                    "decoder",
                    options=["turbo", "wan"],
                    default="turbo",
                    tooltip="turbo: the fast Turbo VAE decoder (official default); wan: the full "
                    "Wan2.2 VAE decoder (slower, heavier).",
                ),
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
        model = vae.turbo if decoder == "turbo" else vae.wan
        if model is None:
            raise InputError(
                f"the {decoder} decoder was not loaded: set it in the MagiHuman Video VAE Loader"
            )
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
