"""The device-free memory model of the codecs (see :mod:`.memory_model`): the T5-Gemma encoder (bf16 and
FP8) encoding one prompt, and the Turbo and Wan2.2 video decoders on a 5-second clip, all full size, with
fake CPU tensors and the live-storage counter (nothing allocated).

The fake device is the CPU, so a decode that offloads finished windows to system memory cannot be told apart
from one that keeps them: the 1080p Turbo row is one window (the device peak of an offloaded decode, plus its
latent), the other rows the whole clip kept on the device."""

from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..fp8.capability import FP8_MATMUL
from ..fp8.linear import Fp8Linear
from ..pipeline.codecs.text_encoder import TARGET_LENGTH, TEXT_WIDTH, _swap_linears
from ..pipeline.codecs.turbo_vae import TurboConfig, TurboVAEDecoder
from ..pipeline.codecs.wan_vae import WanVAE
from .live_bytes import LiveBytes
from .vae_decode import FULL_CLIP_LATENTS, SIZES

# google/t5gemma-9b-9b-ul2's encoder (a Gemma-2 9B stack); only the encoder is built.
T5GEMMA_9B = dict(
    hidden_size=TEXT_WIDTH, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, vocab_size=256000,
)  # fmt: skip


@dataclass(frozen=True)
class StagePrediction:
    name: str
    resident: int  # weights and inputs, bytes
    activations: int  # peak above resident


def fake_weights(model: nn.Module, fake: FakeTensorMode, dtype: torch.dtype) -> None:
    """Replace a meta model's parameters and buffers by fake CPU tensors (floats in ``dtype``, FP8 linear
    weights padded as loaded); FP8 linears take the GPU's ``_scaled_mm`` path with bf16 outputs."""
    shapes = {key: (t.shape, t.dtype) for key, t in model.state_dict(keep_vars=True).items()}
    with fake:
        state = {}
        for key, (shape, kind) in shapes.items():
            owner = model.get_submodule(key.rpartition(".")[0])
            if isinstance(owner, Fp8Linear):
                state[key] = owner.empty_weight("cpu") if key.endswith(".weight") else torch.empty(shape)
            else:
                state[key] = torch.empty(shape, dtype=dtype if kind.is_floating_point else kind)
        model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.path, module.compute_dtype = FP8_MATMUL, torch.bfloat16


def count(name: str, model: nn.Module, fake: FakeTensorMode, run, inputs) -> StagePrediction:
    with fake, torch.inference_mode():
        tensors = inputs()
        counter = LiveBytes()
        for tensor in [*model.parameters(), *model.buffers(), *tensors]:
            counter.track(tensor)
        resident = counter.live
        with counter:
            run(*tensors)
    return StagePrediction(name, resident, counter.peak - resident)


def predict_text_encoder(fp8: bool, tokens: int = TARGET_LENGTH) -> StagePrediction:
    """One encode of a prompt of ``tokens`` tokens (640: the most the DiT reads) on the device."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    config = T5GemmaConfig(encoder=dict(T5GEMMA_9B), decoder=dict(T5GEMMA_9B), vocab_size=256000)
    config.is_encoder_decoder = False
    with torch.device("meta"):
        model = T5GemmaEncoderModel(config)
    if fp8:
        _swap_linears(model)
    fake = FakeTensorMode()
    fake_weights(model, fake, torch.bfloat16)
    with fake:
        model.encoder.rotary_emb = type(model.encoder.rotary_emb)(config=config.encoder)
    model.eval()

    def inputs():
        return torch.zeros(1, tokens, dtype=torch.long), torch.ones(1, tokens, dtype=torch.long)

    def run(ids, mask):
        model(input_ids=ids, attention_mask=mask).last_hidden_state.half()

    return count(f"T5-Gemma {'fp8' if fp8 else 'bf16'}", model, fake, run, inputs)


def predict_decode(decoder: str, size: str) -> StagePrediction:
    """The Turbo or Wan decode of a 5 s clip (32 latent frames) at ``size`` in bf16; Turbo at 1080p: one
    non-first window of 9 latent frames (finished windows go to system memory)."""
    width, height = SIZES[size]
    model = (TurboVAEDecoder(TurboConfig()) if decoder == "turbo" else WanVAE()).to("meta")
    fake = FakeTensorMode()
    fake_weights(model, fake, torch.bfloat16)
    model.eval()
    window = decoder == "turbo" and size == "1080p"
    frames = 9 if window else FULL_CLIP_LATENTS

    def inputs():
        return (torch.empty(1, 48, frames, height // 16, width // 16, dtype=torch.bfloat16),)

    def run(latent):
        if window:
            model.decoder(latent, first_chunk=False)
        else:
            model.decode(latent)

    name = f"{decoder} {size}" + (" (one window)" if window else "")
    return count(name, model, fake, run, inputs)
