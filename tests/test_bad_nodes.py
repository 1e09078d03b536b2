"""Battery, part 3: the same bad inputs reaching ComfyUI users through the nodes (tests/fake_comfy stands in
for ComfyUI). Every error is one of the pack's own exception types, with the text that names the input."""

import pytest
import torch
from magihuman.fp8.errors import CheckpointError, InputError, MagiHumanError
from magihuman.pipeline.codecs.text_encoder import TARGET_LENGTH

pytest_plugins = ["comfy_fixtures"]


def run(comfy, name, **inputs):
    node = next(n for n in comfy.nodes.NODES if n.__name__ == name)
    return node.execute(**inputs).result


def dit(comfy, model):
    return run(
        comfy, "DiTLoader", model=model, variant="auto", compute="auto", attention="sdpa", swap_layers=0
    )[0]


@pytest.fixture(scope="module")
def stack(comfy):
    (vae,) = run(comfy, "VAELoader", turbo_vae="turbo_vae/", wan_vae="Wan2.2_VAE.pth")
    (audio_vae,) = run(comfy, "AudioVAELoader", audio_vae="stable-audio-open-1.0/model.safetensors")
    (text_encoder,) = run(
        comfy, "TextEncoderLoader", text_encoder="t5gemma-9b-9b-ul2/", weights="bf16", device="cpu"
    )
    (cond,) = run(
        comfy, "TextEncode", text_encoder=text_encoder, prompt="a woman says hello", negative_prompt="x"
    )
    dits = dict(dit=dit(comfy, "distill_fp8/"), sr_dit=dit(comfy, "540p_sr_fp8/"))
    return dict(**dits, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, cond=cond)


def expect(error_type, words, action):
    with pytest.raises(MagiHumanError) as error:
        action()
    assert isinstance(error.value, error_type), type(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


def encode(comfy, stack, prompt="a woman says hello", **extra):
    return run(
        comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt=prompt, negative_prompt="x", **extra
    )


TONE = torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 220).view(1, 1, -1)


def sound(waveform, rate=16000):
    return {"waveform": waveform, "sample_rate": rate}


CONDITIONING = [
    ("empty prompt", dict(prompt=""), ["the prompt is empty"]),
    ("blank prompt", dict(prompt=" \n\t "), ["the prompt is empty"]),
    ("1x1 image", dict(image=torch.rand(1, 1, 1, 3)), ["the reference image is 1x1 pixels", "16x16"]),
    ("thin image", dict(image=torch.rand(1, 4, 300, 3)), ["is 300x4 pixels"]),
    ("image without channels", dict(image=torch.rand(1, 64, 64)), ["must be an IMAGE", "[1, 64, 64]"]),
    ("image of five channels", dict(image=torch.rand(1, 64, 64, 5)), ["must be an IMAGE"]),
    ("empty image batch", dict(image=torch.rand(0, 64, 64, 3)), ["empty IMAGE batch"]),
    ("NaN image", dict(image=torch.full((1, 32, 32, 3), float("nan"))), ["NaN or Inf pixel values"]),
    ("audio without rate", dict(audio={"waveform": TONE}), ["driving audio", "'sample_rate'"]),
    ("audio not a dict", dict(audio=[1, 2, 3]), ["driving audio", "AUDIO dict"]),
    ("audio of no samples", dict(audio=sound(TONE[..., :0])), ["mono or stereo"]),
    ("audio of five channels", dict(audio=sound(TONE.expand(1, 5, -1))), ["mono or stereo", "[1, 5, 16000]"]),
    ("audio rate zero", dict(audio=sound(TONE, 0)), ["positive sample rate"]),
    ("NaN audio", dict(audio=sound(TONE * float("nan"))), ["NaN or Inf samples"]),
]  # fmt: skip


@pytest.mark.parametrize("name, inputs, words", CONDITIONING, ids=[case[0] for case in CONDITIONING])
def test_conditioning_refuses_bad_inputs_before_encoding(comfy, stack, monkeypatch, name, inputs, words):
    encoder = stack["text_encoder"].encoder
    monkeypatch.setattr(encoder, "encode", lambda *_: pytest.fail("encoded before the inputs were checked"))
    expect(InputError, words, lambda: encode(comfy, stack, **inputs))


def test_a_long_prompt_is_cut_at_tokenization_and_the_user_told(comfy, stack, monkeypatch, caplog):
    shown = []
    monkeypatch.setattr(comfy.nodes.conditioning, "status_text", shown.append)
    (cond,) = encode(comfy, stack, prompt="a woman says hello " * 5000)  # 20,000 words
    assert cond.prompt.length == TARGET_LENGTH and cond.prompt.dropped == 20001 - TARGET_LENGTH
    assert "the prompt is 20001 tokens; the DiT reads the first 640" in caplog.text
    assert shown and "the last 19361 are dropped" in shown[0]


def sampler_inputs(stack, **overrides):
    inputs = dict(dit=stack["dit"], conditioning=stack["cond"], seconds=0.2, width=64, height=64, seed=1,
                  steps=2, shift=5.0, vae=stack["vae"], audio_vae=stack["audio_vae"])  # fmt: skip
    inputs.update(overrides)
    return inputs


BASE_EXTRA = dict(video_cfg=5.0, video_cfg_late=2.0, cfg_switch_t=500, audio_cfg=5.0, batch_cfg="sequential")


@pytest.mark.parametrize("node, extra", [("DistillSampler", {}), ("BaseSampler", BASE_EXTRA)])
def test_a_super_resolution_dit_in_a_base_sampler_is_refused(comfy, stack, node, extra, monkeypatch):
    monkeypatch.setattr(
        stack["sr_dit"].managed, "use", lambda: pytest.fail("the DiT was moved before the check")
    )
    words = ["the dit input is the sr_540p DiT", "540p_sr_fp8/", "MagiHuman Super-Resolution"]
    expect(InputError, words, lambda: run(comfy, node, **sampler_inputs(stack, dit=stack["sr_dit"]), **extra))


def sr_inputs(stack, latent, **overrides):
    inputs = dict(sr_dit=stack["sr_dit"], latent=latent, conditioning=stack["cond"], target="custom",
                  width=128, height=128, seed=2, steps=1, shift=5.0, noise_index=220, audio_noise_scale=0.7,
                  sr_cfg=1.0, cfg_trick_frames=13, cfg_trick_value=2.0)  # fmt: skip
    inputs.update(overrides)
    return inputs


@pytest.fixture(scope="module")
def base_latent(comfy, stack):
    return run(comfy, "DistillSampler", **sampler_inputs(stack))[0]


def test_a_base_dit_in_the_super_resolution_node_is_refused(comfy, stack, base_latent):
    words = ["sr_dit is the 'distill' DiT", "distill_fp8/", "super-resolution needs an SR DiT"]
    expect(
        InputError,
        words,
        lambda: run(comfy, "SuperResolution", **sr_inputs(stack, base_latent, sr_dit=stack["dit"])),
    )


SAMPLER_VALUES = [
    (dict(seconds=0.05), ["seconds must be a multiple of 1/25", "0.05"]),
    (dict(seconds=0.0), ["seconds 0 means 'as long as the driving audio'", "no audio"]),
    (dict(seconds=-1.0), ["seconds must be more than 0"]),
    (dict(width=7), ["width must be a whole number of pixels from 64", "7"]),
    (dict(height=99999), ["height must be a whole number of pixels", "99999"]),
    (dict(steps=0), ["steps must be a whole number from 1"]),
]


@pytest.mark.parametrize("overrides, words", SAMPLER_VALUES)
def test_bad_sampler_values_are_the_packs_input_errors(comfy, stack, overrides, words):
    expect(InputError, words, lambda: run(comfy, "DistillSampler", **sampler_inputs(stack, **overrides)))


@pytest.mark.parametrize(
    "overrides, words", [(dict(width=8), ["width must be"]), (dict(height=5), ["height must be"])]
)
def test_bad_super_resolution_size_is_an_input_error(comfy, stack, base_latent, overrides, words):
    expect(
        InputError, words, lambda: run(comfy, "SuperResolution", **sr_inputs(stack, base_latent, **overrides))
    )


def test_conditioning_that_needs_a_vae_says_which(comfy, stack):
    (with_image,) = encode(comfy, stack, image=torch.rand(1, 64, 64, 3))
    (with_audio,) = encode(comfy, stack, audio={"waveform": TONE, "sample_rate": 16000})
    no_vae = sampler_inputs(stack, conditioning=with_image, vae=None)
    expect(InputError, ["needs the Wan2.2 VAE"], lambda: run(comfy, "DistillSampler", **no_vae))
    no_audio_vae = sampler_inputs(stack, conditioning=with_audio, audio_vae=None)
    expect(
        InputError,
        ["driving audio needs the audio VAE"],
        lambda: run(comfy, "DistillSampler", **no_audio_vae),
    )


def test_a_nan_latent_from_the_sampler_names_the_dit(comfy, stack, monkeypatch):
    samplers = comfy.nodes.samplers
    original = samplers.generate_long

    def poisoned(model, request):
        latent = original(model, request)
        latent.audio[0, 0, 0] = float("inf")
        return latent

    monkeypatch.setattr(samplers, "generate_long", poisoned)
    words = [
        "distill sampling stage produced NaN or Inf values in its audio latent",
        "distill_fp8/",
        "re-download",
    ]
    expect(CheckpointError, words, lambda: run(comfy, "DistillSampler", **sampler_inputs(stack)))


def test_missing_decoder_and_missing_vaes_are_input_errors(comfy, stack, base_latent):
    from magihuman.nodes.types import VideoVAEs

    only_turbo = VideoVAEs(stack["vae"].turbo, None)
    decode = dict(
        latent=base_latent, vae=only_turbo, audio_vae=stack["audio_vae"], offload_frames=False, tile=0
    )
    expect(
        InputError, ["the wan decoder was not loaded"], lambda: run(comfy, "Decode", decoder="wan", **decode)
    )
    expect(
        InputError,
        ["choose at least one video VAE"],
        lambda: run(comfy, "VAELoader", turbo_vae="none", wan_vae="none"),
    )


DIT_OPTIONS = dict(compute="auto", attention="sdpa", swap_layers=0)


@pytest.mark.parametrize(
    "node, inputs, words",
    [
        ("DiTLoader", dict(DIT_OPTIONS, model="distill_typo/", variant="distill"),
         ["'distill_typo/' is not in the 'diffusion_models' folder"]),
        ("DiTLoader", dict(DIT_OPTIONS, model="mystery/", variant="auto"),
         ["'mystery/' is not in the 'diffusion_models' folder"]),
        ("AudioVAELoader", dict(audio_vae="missing.safetensors"),
         ["'missing.safetensors' is not in the 'vae' folder"]),
        ("TextEncoderLoader", dict(text_encoder="t5_typo/", weights="bf16", device="cpu"),
         ["'t5_typo/' is not in the 'text_encoders' folder"]),
    ],
)  # fmt: skip
def test_loader_given_a_missing_model_names_the_folder(comfy, node, inputs, words):
    expect(CheckpointError, words, lambda: run(comfy, node, **inputs))


def test_status_text_reaches_the_running_node_in_comfyui(comfy, monkeypatch):
    import sys
    from types import ModuleType, SimpleNamespace

    sent = []
    server, execution = ModuleType("server"), ModuleType("comfy_execution.utils")
    server.PromptServer = SimpleNamespace(
        instance=SimpleNamespace(send_progress_text=lambda *a: sent.append(a))
    )
    execution.get_executing_context = lambda: SimpleNamespace(node_id="12")
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "comfy_execution", ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", execution)
    comfy.nodes.progress.status_text("prompt too long")
    assert sent == [("prompt too long", "12")]
    server.PromptServer = SimpleNamespace()  # ComfyUI imported but its server not started: nothing to show
    comfy.nodes.progress.status_text("prompt too long")
    assert len(sent) == 1
