"""The conditioning node: the prompt and negative prompt encoded by T5-Gemma, plus an optional reference
image and optional driving audio (both encoded later, by the samplers, at each stage's size)."""

from comfy_api.latest import io

from ..pipeline.codecs.audio_io import check_audio
from ..pipeline.codecs.text_encoder import NEGATIVE_PROMPT, TARGET_LENGTH
from ..pipeline.media.frames import check_reference_image
from ..pipeline.preflight import check_prompt
from .memory import module_bytes, on_device
from .progress import status_text
from .types import CONDITIONING, TEXT_ENCODER, LoadedTextEncoder, MagiConditioning


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanTextEncode",
            display_name="MagiHuman Conditioning",
            category="MagiHuman",
            description="Encodes the prompt (and the negative prompt used by guidance) and attaches an "
            "optional reference image (first frame) and driving audio (lip-sync). Unchanged prompts are not "
            "re-encoded.",
            inputs=[
                TEXT_ENCODER.Input("text_encoder", tooltip="From MagiHuman T5-Gemma Loader."),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The scene, the people and what they do, then 'Dialogue:' lines and a "
                    "'Background Sound:' line; the model was trained on detailed 150-200 word prompts.",
                ),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default=NEGATIVE_PROMPT,
                    tooltip="What guidance steers away from (base model and SR guidance only). The "
                    "default is the official one; keep its audio and speech parts.",
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="Optional reference image: becomes the first frame (centre-cropped to the "
                    "clip's aspect). Needs the Wan2.2 VAE in the sampler's vae input.",
                ),
                io.Audio.Input(
                    "audio",
                    optional=True,
                    tooltip="Optional driving audio: the video is generated in sync with it and the "
                    "clip keeps this sound. Needs the audio VAE in the sampler's audio_vae input.",
                ),
            ],  # fmt: skip
            outputs=[CONDITIONING.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder: LoadedTextEncoder, prompt, negative_prompt, image=None, audio=None):
        check_prompt(prompt, "the prompt")  # all inputs first: a bad picture fails before encoding
        if image is not None:
            check_reference_image(image)
        if audio is not None:
            check_audio(audio)
        encoder = text_encoder.encoder
        if text_encoder.run_on_gpu:
            with on_device(encoder, module_bytes(encoder.model)):
                embeddings = encoder.encode(prompt), encoder.encode(negative_prompt)
        else:
            embeddings = encoder.encode(prompt), encoder.encode(negative_prompt)
        if embeddings[0].dropped:
            status_text(
                f"prompt too long: the DiT reads its first {TARGET_LENGTH} tokens, the last "
                f"{embeddings[0].dropped} are dropped"
            )
        return io.NodeOutput(MagiConditioning(*embeddings, image, audio))
