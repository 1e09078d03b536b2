"""The ComfyUI nodes, without ComfyUI (tests/fake_comfy stands in for its API): schemas, and every node's
execute driving the pipeline on the tiny demo models, as a workflow would chain them."""

import asyncio
import sys

import pytest
import torch
from magihuman.fp8.checkpoint import CheckpointError
from magihuman.pipeline.sampling.latent import MagiLatent

pytest_plugins = ["comfy_fixtures"]


def node(comfy, name):
    return next(n for n in comfy.nodes.NODES if n.__name__ == name)


def run(comfy, name, **inputs):
    return node(comfy, name).execute(**inputs).result


@pytest.fixture(scope="module")
def stack(comfy):
    """Loaded models and conditioning, as the loader and conditioning nodes produce them."""
    (dit,) = run(
        comfy,
        "DiTLoader",
        model="distill_fp8/",
        variant="auto",
        compute="auto",
        attention="auto",
        swap_layers=0,
    )
    (sr_dit,) = run(
        comfy,
        "DiTLoader",
        model="540p_sr_fp8/",
        variant="auto",
        compute="auto",
        attention="sdpa",
        swap_layers=0,
    )
    (vae,) = run(comfy, "VAELoader", turbo_vae="turbo_vae/", wan_vae="Wan2.2_VAE.pth")
    (audio_vae,) = run(comfy, "AudioVAELoader", audio_vae="stable-audio-open-1.0/model.safetensors")
    (text_encoder,) = run(
        comfy, "TextEncoderLoader", text_encoder="t5gemma-9b-9b-ul2/", weights="bf16", device="gpu"
    )
    (cond,) = run(
        comfy, "TextEncode", text_encoder=text_encoder, prompt="a woman says hello", negative_prompt="static"
    )
    return dict(dit=dit, sr_dit=sr_dit, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, cond=cond)


def sample(comfy, stack, cond=None, **overrides):
    inputs = dict(dit=stack["dit"], conditioning=cond or stack["cond"], seconds=0.96, width=64, height=64,
                  seed=1, steps=8, shift=5.0, vae=stack["vae"], audio_vae=stack["audio_vae"])  # fmt: skip
    inputs.update(overrides)
    return run(comfy, "DistillSampler", **inputs)[0]


def test_every_schema_builds_with_unique_ids_tooltips_and_one_category_root(comfy):
    nodes = comfy.nodes.NODES
    extension = asyncio.run(comfy.nodes.comfy_entrypoint())
    assert asyncio.run(extension.get_node_list()) == nodes
    ids = []
    for n in nodes:
        schema = n.define_schema()
        schema.validate()
        ids.append(schema.node_id)
        assert schema.node_id.startswith("MagiHuman") and schema.category.startswith("MagiHuman")
        assert schema.display_name and schema.description
        for i in schema.inputs:
            assert i.tooltip, f"{schema.node_id}.{i.id} has no tooltip"
    assert len(ids) == len(set(ids)) == 12


def test_our_objects_travel_on_our_own_socket_types(comfy):
    core = {"MODEL", "VAE", "CLIP", "LATENT", "CONDITIONING"}
    for n in comfy.nodes.NODES:
        schema = n.define_schema()
        for socket in [*schema.inputs, *schema.outputs]:
            assert socket.io_type not in core, f"{schema.node_id} uses core type {socket.io_type}"


def test_loader_choices_list_sharded_folders_and_files(comfy):
    inputs = {i.id: i for i in node(comfy, "DiTLoader").define_schema().inputs}
    assert inputs["model"].options == ["540p_sr_fp8/", "distill_fp8/"]
    assert inputs["model"].default == "distill_fp8/"
    vae_inputs = {i.id: i for i in node(comfy, "VAELoader").define_schema().inputs}
    assert vae_inputs["turbo_vae"].options == ["turbo_vae/", "none"]
    assert (
        "Wan2.2_VAE.pth" in vae_inputs["wan_vae"].options
        and vae_inputs["wan_vae"].default == "Wan2.2_VAE.pth"
    )
    text = {i.id: i for i in node(comfy, "TextEncoderLoader").define_schema().inputs}
    assert text["text_encoder"].options == ["t5gemma-9b-9b-ul2/"]


def test_a_symlinked_model_folder_is_one_choice_not_its_shards(comfy, tmp_path):
    (tmp_path / "linked_fp8").symlink_to(comfy.models / "diffusion_models" / "distill_fp8")
    paths = comfy.folder_paths.folder_names_and_paths["diffusion_models"][0]
    paths.append(str(tmp_path))
    try:
        options = {i.id: i for i in node(comfy, "DiTLoader").define_schema().inputs}["model"].options
    finally:
        paths.remove(str(tmp_path))
    assert "linked_fp8/" in options
    assert not [o for o in options if o.startswith("linked_fp8/model-")]


def test_text_to_video_then_super_resolution_then_decode(comfy, stack):
    comfy.utils.bars.clear()
    latent = sample(comfy, stack)
    assert (
        isinstance(latent, MagiLatent)
        and latent.video.shape == (1, 48, 7, 4, 4)
        and latent.audio.shape == (1, 25, 64)
    )
    assert [u[0] for u in comfy.utils.bars[-1].updates] == list(range(1, 9))  # one progress update per step
    (sr,) = run(comfy, "SuperResolution", sr_dit=stack["sr_dit"], latent=latent, conditioning=stack["cond"],
                target={"target": "custom", "width": 128, "height": 96}, seed=2, steps=5, shift=5.0,
                noise_index=220, audio_noise_scale=0.7, sr_cfg=1.0, cfg_trick_frames=13,
                cfg_trick_value=2.0)  # fmt: skip
    assert sr.video.shape == (1, 48, 7, 6, 8) and sr.stage == "sr" and torch.equal(sr.audio, latent.audio)
    frames, audio, video = run(comfy, "Decode", latent=sr, vae=stack["vae"], audio_vae=stack["audio_vae"],
                               decoder="turbo", offload_frames=True, tile=0)  # fmt: skip
    assert (
        frames.shape == (25, 96, 128, 3)
        and frames.dtype == torch.float32
        and 0 <= frames.min() <= frames.max() <= 1
    )
    assert audio["sample_rate"] == 44100 and audio["waveform"].shape == (1, 2, 44100)  # 25 frames = 1 s
    components = video.get_components()
    assert components.frame_rate == 25 and components.images is frames and components.audio is audio
    wan_frames, _, _ = run(comfy, "Decode", latent=sr, vae=stack["vae"], audio_vae=stack["audio_vae"],
                           decoder="wan", offload_frames=False, tile=4)  # fmt: skip
    assert wan_frames.shape == frames.shape


def test_base_sampler_with_image_and_driving_audio(comfy, stack):
    # 220 whole cycles in 1 s of mono 16 kHz audio (whole cycles: the FFT resampler sees no edge).
    tone = {
        "waveform": torch.sin(torch.arange(16000) / 16000 * 2 * torch.pi * 220).view(1, 1, -1),
        "sample_rate": 16000,
    }
    (cond,) = run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="a man laughs",
                  negative_prompt="static", image=torch.rand(1, 80, 120, 3), audio=tone)  # fmt: skip
    inputs = dict(dit=stack["dit"], conditioning=cond, seconds=0.96, width=64, height=64, seed=3, steps=3,
                  shift=5.0, video_cfg=5.0, video_cfg_late=2.0, cfg_switch_t=500, audio_cfg=5.0,
                  batch_cfg="auto", vae=stack["vae"], audio_vae=stack["audio_vae"])  # fmt: skip
    (latent,) = run(comfy, "BaseSampler", **inputs)
    assert latent.user_audio and latent.video.shape == (1, 48, 7, 4, 4)
    _, audio, _ = run(comfy, "Decode", latent=latent, vae=stack["vae"], audio_vae=stack["audio_vae"],
                      decoder="turbo", offload_frames=False, tile=0)  # fmt: skip
    expected = torch.sin(torch.arange(44100) / 44100 * 2 * torch.pi * 220)
    assert (audio["waveform"][0, 1] - expected).abs().max() < 5e-3  # the clip's sound is the driving audio


def test_missing_inputs_for_image_or_audio_are_explained(comfy, stack):
    (cond,) = run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="hello",
                  negative_prompt="x", image=torch.rand(1, 64, 64, 3))  # fmt: skip
    with pytest.raises(ValueError, match="reference image needs the Wan2.2 VAE"):
        sample(comfy, stack, cond, vae=None)
    with pytest.raises(ValueError, match="prompt is empty"):
        run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="  ", negative_prompt="x")
    with pytest.raises(ValueError, match="super-resolution needs an SR DiT"):
        run(comfy, "SuperResolution", sr_dit=stack["dit"], latent=sample(comfy, stack),
            conditioning=stack["cond"], target={"target": "540p"}, seed=0, steps=1, shift=5.0,
            noise_index=220, audio_noise_scale=0.7, sr_cfg=1.0, cfg_trick_frames=13,
            cfg_trick_value=2.0)  # fmt: skip


def test_block_swap_and_seeds_do_not_change_results(comfy, stack):
    (swapped,) = run(comfy, "DiTLoader", model="distill_fp8/", variant="distill", compute="auto",
                     attention="sdpa", swap_layers=2)  # fmt: skip
    plain, again, other = (
        sample(comfy, stack, seed=5),
        sample(comfy, stack, seed=5),
        sample(comfy, stack, seed=6),
    )
    assert torch.equal(plain.video, again.video) and not torch.equal(plain.video, other.video)
    assert torch.equal(sample(comfy, stack, dit=swapped, seed=5).video, plain.video)
    # ComfyUI moves only what stays on the device; the swapped layers are the block swap's to move.
    model = swapped.managed.model
    moved = {id(p) for p in swapped.managed.patcher.model.parameters()}
    assert not moved & {id(p) for layer in model.block_swap.layers for p in layer.parameters()}
    assert swapped.managed.patcher.size < stack["dit"].managed.patcher.size


def test_cancel_interrupts_sampling_and_the_next_run_works(comfy, stack):
    comfy.mm.interrupt_current_processing(True)
    with pytest.raises(comfy.mm.InterruptProcessingException):
        sample(comfy, stack)
    assert isinstance(sample(comfy, stack), MagiLatent)


def test_models_are_registered_and_room_is_made(comfy, stack):
    comfy.mm.calls.clear()
    sample(comfy, stack)
    loads = [args for name, args in comfy.mm.calls if name == "load_models_gpu"]
    # The DiT, through its ModelPatcher, whole: our layers cannot run from ComfyUI's partial low-VRAM load;
    # ComfyUI is told the forward's activations (0.96 s at 64x64: 25 frames -> 7 latent frames of 4x4).
    from magihuman.nodes.memory import ACTIVATION_BASE_BYTES, BYTES_PER_TOKEN

    needed = ACTIVATION_BASE_BYTES + (7 * 4 * 4 // 4 + 4 * 6 + 1 + 640) * BYTES_PER_TOKEN
    assert loads == [{"count": 1, "memory_required": needed, "force_full_load": True}]
    assert stack["dit"].managed.patcher.size > 0
    comfy.mm.calls.clear()
    run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="a new prompt", negative_prompt="x")
    assert comfy.mm.calls[0][0] == "free_memory"  # the encoder visits the GPU only after making room


def test_decodes_ask_comfyui_for_their_activations(comfy, stack):
    latent = sample(comfy, stack)
    comfy.mm.calls.clear()
    run(comfy, "Decode", latent=latent, vae=stack["vae"], audio_vae=stack["audio_vae"], decoder="turbo",
        offload_frames=False, tile=0)  # fmt: skip
    weights = sum(t.nbytes for t in [*stack["vae"].turbo.parameters(), *stack["vae"].turbo.buffers()])
    pixels = (4 * 7 - 3) * 64 * 64
    from magihuman.nodes.memory import DECODE_BYTES_PER_PIXEL

    assert comfy.mm.calls[0] == ("free_memory", weights + DECODE_BYTES_PER_PIXEL["turbo"] * pixels)


def test_missing_model_files_say_where_they_go_and_where_they_come_from(comfy):
    with pytest.raises(
        CheckpointError,
        match=r"'base_fp8/' is not in the 'diffusion_models' folder.*'MagiHuman Download Models' node.*"
        r"download --files dit_base.*SanDiegoDude/daVinci-MagiHuman-FP8",
    ):
        run(
            comfy,
            "DiTLoader",
            model="base_fp8/",
            variant="base",
            compute="auto",
            attention="sdpa",
            swap_layers=0,
        )


def test_loading_the_pack_installs_the_example_voice_into_comfyuis_input_folder(comfy, tmp_path):
    comfy.folder_paths.input_directory = str(tmp_path / "input")
    try:
        asyncio.run(asyncio.run(comfy.nodes.comfy_entrypoint()).on_load())
    finally:
        comfy.folder_paths.input_directory = ""
    assert (tmp_path / "input" / "magihuman_example_voice.wav").stat().st_size > 100_000


def test_sr_width_and_height_show_only_for_a_custom_target(comfy, monkeypatch):
    """A dynamic combo: 540p and 1080p bring no inputs, custom brings width and height (as the dict
    ComfyUI passes). Without DynamicCombo (older ComfyUI) they are plain widgets, read only for custom."""
    module = sys.modules["magihuman.nodes.super_resolution"]
    (target,) = [i for i in module.SuperResolution.define_schema().inputs if i.id == "target"]
    assert {o.key: [i.id for i in o.inputs] for o in target.options} == {
        "540p": [], "1080p": [], "custom": ["width", "height"]}  # fmt: skip
    assert module._target_size({"target": {"target": "1080p"}}) == ("1080p", (1920, 1088))
    assert module._target_size({"target": {"target": "custom", "width": 320, "height": 192}})[1] == (320, 192)
    monkeypatch.delattr(comfy.latest.io, "DynamicCombo")
    ids = [i.id for i in module.SuperResolution.define_schema().inputs]
    assert ids[3:6] == ["target", "width", "height"]
    assert module._target_size({"target": "540p", "width": 64, "height": 64}) == ("540p", (896, 512))
    assert module._target_size({"target": "custom", "width": 64, "height": 96}) == ("custom", (64, 96))


def test_the_dit_loads_to_the_offload_device_and_comfyui_brings_it_in(comfy, stack, monkeypatch):
    monkeypatch.setattr(comfy.mm, "get_torch_device", lambda: torch.device("meta"))  # a GPU stand-in
    comfy.mm.calls.clear()
    (dit,) = run(comfy, "DiTLoader", model="distill_fp8/", variant="distill", compute="auto",
                 attention="sdpa", swap_layers=2)  # fmt: skip
    assert {t.device.type for t in dit.managed.model.state_dict().values()} == {"cpu"}
    assert not comfy.mm.calls  # nothing went to the GPU behind ComfyUI's back
    assert dit.managed.patcher.load_device == torch.device("meta")
    swap = dit.managed.model.block_swap
    assert swap.device == torch.device("meta") and len(swap.layers) == 2


def test_dit_loader_swap_auto_swaps_the_fewest_layers_that_fit_the_card(comfy, monkeypatch):
    """swap_layers = -1 (the default): no swap off the GPU; on a GPU the fewest last layers whose swapping
    fits the model, two swapped layers in flight, a default clip's activations and the CUDA context into the
    card less ComfyUI's reserve and what other programs hold on it (the card is faked: the choice needs
    only the checkpoint's headers)."""
    from magihuman.nodes import loaders
    from magihuman.nodes.memory import DEFAULT_LATENTS
    from magihuman.pipeline.dit.device_memory import CUDA_CONTEXT_BYTES, dit_activations, dit_tokens
    from magihuman.pipeline.dit.loading import weight_bytes

    inputs = {i.id: i for i in node(comfy, "DiTLoader").define_schema().inputs}
    assert inputs["swap_layers"].default == -1
    (dit,) = run(comfy, "DiTLoader", model="distill_fp8/", variant="auto", compute="auto", attention="sdpa",
                 swap_layers=-1)  # fmt: skip
    assert getattr(dit.managed.model, "block_swap", None) is None and "swapped" not in dit.description
    path = comfy.models / "diffusion_models" / "distill_fp8"
    model, layers = weight_bytes(path, "distill")
    loaded = dit.managed.model
    assert model == sum(t.nbytes for t in [*loaded.parameters(), *loaded.buffers()])
    activations = dit_activations(dit_tokens(*DEFAULT_LATENTS["distill"]), batched=False)
    need = model + activations + CUDA_CONTEXT_BYTES
    reserve = comfy.mm.minimum_inference_memory()

    def chosen(total, others=0):
        cached = 2**30  # this process's own cache: ComfyUI frees it, so it is not counted
        monkeypatch.setattr(comfy.mm, "total_memory", total)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: cached)
        free = total - others - CUDA_CONTEXT_BYTES - cached
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
        return loaders.auto_swap(path, "distill", "auto", torch.device("cuda"))

    assert chosen(need + reserve) == 0
    # One byte short: two swapped layers are always in flight, so the first saving needs three swapped.
    assert chosen(need + reserve - 1) == 3
    assert chosen(need + reserve, others=1) == 3  # e.g. the display: one byte held by another program
    assert chosen(need + reserve + 2**30, others=2**30) == 0
    assert chosen(need + reserve - min(layers[1:3]) - 1) == len(layers)  # nothing else fits: every layer
    assert chosen(reserve) == len(layers)


def test_text_encoder_auto_precision_follows_the_card_size(comfy, monkeypatch):
    from magihuman.pipeline.codecs.text_encoder import encoder_bytes
    from magihuman.pipeline.dit.device_memory import CUDA_CONTEXT_BYTES

    folder = comfy.models / "text_encoders" / "t5gemma-9b-9b-ul2"
    bf16, fp8 = encoder_bytes(folder, fp8=False), encoder_bytes(folder, fp8=True)
    reserve = comfy.mm.minimum_inference_memory()
    monkeypatch.setattr(comfy.mm, "get_torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    chosen = {}
    cards = {
        "roomy": (bf16 + reserve, 0),
        "tight": (bf16 + reserve - 1, 0),
        "shared": (bf16 + reserve, 1),  # one byte held by another program
        "tiny": (fp8 - 1, 0),
    }
    for name, (total, others) in cards.items():
        monkeypatch.setattr(comfy.mm, "total_memory", total)
        free = total - others - CUDA_CONTEXT_BYTES
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free, total=total: (free, total))
        (loaded,) = run(
            comfy, "TextEncoderLoader", text_encoder="t5gemma-9b-9b-ul2/", weights="auto", device="gpu"
        )
        chosen[name] = (loaded.encoder.name.endswith(" fp8"), loaded.run_on_gpu)
    assert chosen == {
        "roomy": (False, True),
        "tight": (True, True),
        "shared": (True, True),
        "tiny": (False, False),
    }
    (on_cpu,) = run(
        comfy, "TextEncoderLoader", text_encoder="t5gemma-9b-9b-ul2/", weights="auto", device="cpu"
    )
    assert not on_cpu.run_on_gpu and not on_cpu.encoder.name.endswith(" fp8")
    inputs = {i.id: i for i in node(comfy, "TextEncoderLoader").define_schema().inputs}
    assert inputs["weights"].default == "auto"
