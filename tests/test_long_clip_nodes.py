"""The long-clip path through the nodes (fake ComfyUI, tiny demo models): the window node with per-window
prompts, a sampler as long as its driving audio, windowed super-resolution, one progress bar over every
window, and Cancel inside a later window."""

import os

import pytest
import torch
from mp4_checks import assert_same_clip, record_pictures
from test_nodes import node, run, stack  # noqa: F401  (stack is a fixture)

pytest_plugins = ["comfy_fixtures"]


def tone(seconds: float, rate: int = 44100) -> dict:
    t = torch.arange(round(seconds * rate)) / rate
    return {"waveform": (0.5 * torch.sin(2 * torch.pi * 220 * t)).view(1, 1, -1), "sample_rate": rate}


def long_sample(comfy, stack, **overrides):  # noqa: F811
    prompts = "a woman smiles\n\nshe waves"  # two windows' prompts (blank lines skipped); the last serves on
    (windows,) = run(comfy, "LongClipWindows", window_seconds=0.96, overlap=1, window_prompts=prompts,
                     text_encoder=stack["text_encoder"])  # fmt: skip
    (cond,) = run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="a woman says hello",
                  negative_prompt="static", audio=tone(2.92))  # fmt: skip
    inputs = dict(dit=stack["dit"], conditioning=cond, seconds=0.0, width=64, height=64, seed=1, steps=2,
                  shift=5.0, vae=stack["vae"], audio_vae=stack["audio_vae"], windows=windows)  # fmt: skip
    inputs.update(overrides)
    return run(comfy, "DistillSampler", **inputs)[0], cond, windows


def test_a_long_lip_synced_clip_is_as_long_as_its_audio_and_keeps_it(comfy, stack):  # noqa: F811
    comfy.utils.bars.clear()
    latent, cond, windows = long_sample(comfy, stack)
    assert len(windows.prompts) == 2 and windows.settings.latent_frames == 7
    # 2.92 s of audio -> a 2.92 s clip: 74 frames -> 19 latent frames = 3 windows of 7, overlapping by 1
    assert latent.video.shape == (1, 48, 19, 4, 4) and latent.audio.shape == (1, 74, 64) and latent.user_audio
    assert [u[:2] for u in comfy.utils.bars[-1].updates] == [(i, 6) for i in range(1, 7)]  # 3 windows x 2
    (sr,) = run(comfy, "SuperResolution", sr_dit=stack["sr_dit"], latent=latent, conditioning=cond,
                target="custom", width=128, height=128, seed=2, steps=2, shift=5.0, noise_index=220,
                audio_noise_scale=0.7, sr_cfg=1.0, cfg_trick_frames=13, cfg_trick_value=2.0,
                windows=windows)  # fmt: skip
    assert sr.video.shape == (1, 48, 19, 8, 8) and torch.equal(sr.audio, latent.audio)
    frames, audio, _ = run(comfy, "Decode", latent=sr, vae=stack["vae"], audio_vae=stack["audio_vae"],
                           decoder="turbo", offload_frames=True, tile=0)  # fmt: skip
    given = tone(2.92)["waveform"][0, 0]
    assert frames.shape[0] == 73 and audio["waveform"].shape[-1] == given.shape[0]  # 2.92 s, both
    middle = slice(2000, given.shape[0] - 4000)  # the FFT resampler rings at the edges of the padded clip
    assert (audio["waveform"][0, 1, middle] - given[middle]).abs().max() < 5e-3


def test_seconds_zero_needs_driving_audio_and_window_prompts_need_the_encoder(comfy, stack):  # noqa: F811
    with pytest.raises(ValueError, match="window prompts need the text encoder"):
        run(comfy, "LongClipWindows", window_seconds=0.96, overlap=1, window_prompts="hi")
    with pytest.raises(ValueError, match="window seconds must be a multiple of 0.16"):
        run(comfy, "LongClipWindows", window_seconds=1.0, overlap=1, window_prompts="")
    with pytest.raises(ValueError, match="as long as the driving audio"):
        run(comfy, "DistillSampler", dit=stack["dit"], conditioning=stack["cond"], seconds=0.0, width=64,
            height=64, seed=1, steps=2, shift=5.0)  # fmt: skip


def test_cancel_inside_a_later_window_stops_the_run(comfy, stack, monkeypatch):  # noqa: F811
    bar_class = comfy.utils.ProgressBar
    update = bar_class.update_absolute

    def cancel_after_the_first_window(self, value, total=None, preview=None):
        update(self, value, total, preview)
        if value == 3:  # the first step of window 2: the next model call must not happen
            comfy.mm.interrupt_current_processing(True)

    monkeypatch.setattr(bar_class, "update_absolute", cancel_after_the_first_window)
    comfy.utils.bars.clear()
    with pytest.raises(comfy.mm.InterruptProcessingException):
        long_sample(comfy, stack)
    assert [u[0] for u in comfy.utils.bars[-1].updates] == [1, 2, 3]


@pytest.mark.parametrize(
    "image, anchor, anchored", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_a_reference_image_anchors_every_window_unless_turned_off(
    comfy,
    stack,  # noqa: F811
    monkeypatch,
    image,
    anchor,
    anchored,
):
    from magihuman.nodes import samplers, super_resolution
    from magihuman.pipeline.sampling.long_clips import generate_long, generate_long_sr

    seen = []
    monkeypatch.setattr(samplers, "generate_long", lambda dit, r: seen.append(r) or generate_long(dit, r))

    def sr(dit, latent, r):
        return seen.append(r) or generate_long_sr(dit, latent, r)

    monkeypatch.setattr(super_resolution, "generate_long_sr", sr)
    (windows,) = run(comfy, "LongClipWindows", window_seconds=0.96, overlap=1, window_prompts="",
                     anchor_reference=anchor)  # fmt: skip
    extra = dict(image=torch.rand(1, 64, 64, 3)) if image else {}
    (cond,) = run(comfy, "TextEncode", text_encoder=stack["text_encoder"], prompt="a woman says hello",
                  negative_prompt="static", **extra)  # fmt: skip
    (latent,) = run(comfy, "DistillSampler", dit=stack["dit"], conditioning=cond, seconds=2.0, width=64,
                    height=64, seed=1, steps=1, shift=5.0, vae=stack["vae"], windows=windows)  # fmt: skip
    run(comfy, "SuperResolution", sr_dit=stack["sr_dit"], latent=latent, conditioning=cond, target="custom",
        width=128, height=128, seed=2, steps=1, shift=5.0, noise_index=220, audio_noise_scale=0.7, sr_cfg=1.0,
        cfg_trick_frames=13, cfg_trick_value=2.0, vae=stack["vae"], windows=windows)  # fmt: skip
    assert [r.windows.anchor for r in seen] == [anchored, anchored]
    assert latent.video.shape[2] == 13  # 2 s: 51 frames, 13 latents, cut into windows of 7 either way


def test_decode_to_file_writes_the_same_mp4_as_decoded_frames(comfy, stack, tmp_path, monkeypatch):  # noqa: F811
    from magihuman.pipeline.media.files import write_mp4

    monkeypatch.setattr(comfy.folder_paths, "temp_directory", str(tmp_path / "temp"))
    latent, _, _ = long_sample(comfy, stack)
    pictures = record_pictures(monkeypatch)
    video, audio = run(comfy, "DecodeToFile", latent=latent, vae=stack["vae"], audio_vae=stack["audio_vae"],
                       decoder="turbo")  # fmt: skip
    path = video.get_stream_source()
    assert os.path.dirname(path) == str(tmp_path / "temp") and path.endswith(".mp4")
    frames, sound, _ = run(comfy, "Decode", latent=latent, vae=stack["vae"], audio_vae=stack["audio_vae"],
                           decoder="turbo", offload_frames=False, tile=0)  # fmt: skip
    assert torch.equal(audio["waveform"], sound["waveform"])  # the driving audio, cut to the 73 frames
    streamed_pictures = pictures[:]
    pictures.clear()
    whole = write_mp4(tmp_path / "whole.mp4", frames, sound)
    assert len(pictures) == 73
    assert_same_clip(streamed_pictures, path, pictures, whole)
    with pytest.raises(ValueError, match="wan decoder was not loaded"):
        run(comfy, "DecodeToFile", latent=latent, vae=type(stack["vae"])(stack["vae"].turbo, None),
            audio_vae=stack["audio_vae"], decoder="wan")  # fmt: skip
