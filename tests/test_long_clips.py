"""Long clips on the tiny demo stack: the window plan, held overlap frames, driving-audio slices, the sound
and length of the result, a windowed run against windows chained by hand, windowed super-resolution."""

from dataclasses import replace

import pytest
import torch
from conftest import load_cli
from magihuman.pipeline.codecs.audio_io import from_audio, to_audio
from magihuman.pipeline.codecs.audio_vae import load_audio_vae
from magihuman.pipeline.codecs.text_encoder import TextEmbedding
from magihuman.pipeline.codecs.turbo_vae import load_turbo_vae, turbo_files
from magihuman.pipeline.demo import build_models
from magihuman.pipeline.dit.loading import load_dit
from magihuman.pipeline.media.files import read_audio, write_mp4, write_wav
from magihuman.pipeline.sampling.latent import MagiLatent
from magihuman.pipeline.sampling.long_clips import generate_long, generate_long_sr
from magihuman.pipeline.sampling.loops import Hooks
from magihuman.pipeline.sampling.requests import BaseRequest, SRRequest
from magihuman.pipeline.sampling.sizes import clip_size
from magihuman.pipeline.sampling.stages import (
    decode,
    decode_audio,
    decode_stream,
    driving_audio,
    generate_base,
)
from magihuman.pipeline.sampling.super_resolution import SRSettings
from magihuman.pipeline.sampling.windows import WindowSettings, plan_windows
from mp4_checks import assert_same_clip, record_pictures, streams

WINDOW = WindowSettings(0.96, 1)  # 7 latent frames: a 2.88 s clip (19 latents) is exactly 3 windows
SIZE = clip_size(2.88, 64, 64)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = build_models(tmp_path_factory.mktemp("models"))
    dit, _ = load_dit(models / "diffusion_models" / "distill_fp8")
    sr_dit, _ = load_dit(models / "diffusion_models" / "540p_sr_fp8")
    audio_vae = load_audio_vae(models / "vae" / "stable-audio-open-1.0" / "model.safetensors")
    turbo = load_turbo_vae(*turbo_files(models / "vae" / "turbo_vae"))
    return dict(models=models, dit=dit, sr_dit=sr_dit, audio_vae=audio_vae, turbo=turbo)


def embedding(seed: int, length: int = 5) -> TextEmbedding:
    features = torch.zeros(1, 640, 3584, dtype=torch.float16)
    features[:, :length] = torch.randn(1, length, 3584, generator=torch.Generator().manual_seed(seed)).half()
    return TextEmbedding(features, length)


class Recorder:
    """The DiT, keeping every input it is called with."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, video, audio, text):
        self.calls.append((video.clone(), audio.clone(), text.clone()))
        return self.model(video, audio, text)


def request(**overrides) -> BaseRequest:
    fields = dict(size=SIZE, text=embedding(0), seed=7, steps=2, windows=WINDOW)
    fields.update(overrides)
    return BaseRequest(**fields)


def tone(seconds: float, rate: int = 44100) -> dict:
    t = torch.arange(round(seconds * rate)) / rate
    wave = torch.stack([torch.sin(2 * torch.pi * 220 * t), 0.5 * torch.sin(2 * torch.pi * 330 * t)])
    return {"waveform": wave.unsqueeze(0) * 0.5, "sample_rate": rate}


@pytest.mark.parametrize("seconds", [0.04, 0.96, 1.0, 2.88, 3.0, 9.96, 20.0, 60.0, 600.0])
@pytest.mark.parametrize(
    "window",
    [WindowSettings(), WINDOW, WindowSettings(0.96, 3), WindowSettings(4.0, 2), WindowSettings(0.96, 1, True),
     WindowSettings(0.96, 5, True)],
)  # fmt: skip
def test_windows_cover_the_clip_exactly_once(seconds, window):
    size = clip_size(seconds, 64, 64)
    windows = plan_windows(size, window)
    frames = [g for w in windows for g in range(size.latent_frames)[w.new_frames]]
    audio = [a for w in windows for a in range(size.audio_frames)[w.new_audio]]
    assert frames == list(range(size.latent_frames))  # no gap, no overlap, in order
    assert audio == list(range(size.audio_frames))
    for previous, w in zip(windows, windows[1:], strict=False):
        assert w.held == window.overlap + window.anchor
        assert w.start == previous.start + previous.size.latent_frames - w.held
        assert w.audio_start + w.held_audio == previous.audio_start + previous.size.audio_frames
    assert all(w.size.latent_frames <= max(window.latent_frames, size.latent_frames) for w in windows)
    assert windows[0].held == 0 and (len(windows) == 1) == (size.latent_frames <= window.latent_frames)


@pytest.mark.parametrize(
    "seconds, overlap, message",
    [(1.0, 1, "multiple of 0.16"), (0, 1, "multiple of 0.16"), (80.0, 1, "multiple of 0.16"),
     (0.96, 0, "overlap must be"), (0.96, 7, "from 1 to 6")],
)  # fmt: skip
def test_bad_window_settings_are_explained(seconds, overlap, message):
    with pytest.raises(ValueError, match=message):
        WindowSettings(seconds, overlap)


def test_an_anchored_window_leaves_a_slot_for_the_reference_and_needs_one():
    with pytest.raises(ValueError, match="from 1 to 5 .*one slot going to the reference image"):
        WindowSettings(0.96, 6, anchor=True)
    with pytest.raises(ValueError, match="anchored to the reference image need one"):
        request(windows=WindowSettings(0.96, 1, anchor=True))


def test_the_reference_image_anchors_every_window_before_the_previous_frames(stack):
    window = WindowSettings(0.96, 2, anchor=True)  # held: the reference, then 2 frames of the previous window
    reference = torch.randn(1, 48, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    model = Recorder(stack["dit"])
    long = generate_long(model, request(windows=window, image_latent=reference, steps=2))
    windows = plan_windows(SIZE, window)
    assert len(windows) == 4 and long.video.shape[2] == SIZE.latent_frames and long.audio.shape[1] == 73
    assert torch.equal(long.video[:, :, :1], reference)  # window 0 starts from it, as a short clip does
    for w in windows[1:]:
        previous = long.video[:, :, w.start + 1 : w.start + w.held]  # the previous window's last 2 frames
        sound = long.audio[:, w.audio_start : w.audio_start + w.held_audio]  # its sound over all 3 slots
        for video, audio, _ in model.calls[2 * w.index : 2 * w.index + 2]:
            assert torch.equal(video[:, :, :1], reference) and torch.equal(video[:, :, 1 : w.held], previous)
            assert torch.equal(audio[:, : w.held_audio], sound)
    # Off, the same clip holds only the previous frames after window 0: the reference is not seen again.
    model = Recorder(stack["dit"])
    generate_long(model, request(windows=WindowSettings(0.96, 2), image_latent=reference, steps=2))
    assert not any(torch.equal(video[:, :, :1], reference) for video, _, _ in model.calls[2:])


def test_anchored_super_resolution_holds_the_reference_at_the_sr_size_in_every_window(stack):
    window = WindowSettings(0.96, 1, anchor=True)
    base = generate_long(stack["dit"], request(windows=window, image_latent=torch.zeros(1, 48, 1, 4, 4)))
    reference = torch.randn(1, 48, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    sr_size = clip_size(SIZE.seconds, 128, 128)
    model = Recorder(stack["sr_dit"])
    sr = SRRequest(size=sr_size, text=embedding(0), seed=3, windows=window, image_latent=reference,
                   settings=SRSettings(steps=2))  # fmt: skip
    long = generate_long_sr(model, base, sr)
    assert long.video.shape == (1, 48, SIZE.latent_frames, 8, 8)
    for w in plan_windows(sr_size, window)[1:]:
        for video, _, _ in model.calls[2 * w.index : 2 * (w.index + 1)]:
            assert torch.equal(video[:, :, :1], reference)
            assert torch.equal(video[:, :, 1:2], long.video[:, :, w.start + 1 : w.start + 2])


def test_a_three_window_run_equals_three_windows_chained_by_hand(stack):
    prompts = (embedding(1), embedding(2, 7))  # the second serves windows 2 and 3
    long = generate_long(stack["dit"], request(prompts=prompts))
    assert long.video.shape == (1, 48, SIZE.latent_frames, 4, 4) and long.audio.shape == (1, 73, 64)

    one = replace(request(), size=clip_size(0.96, 64, 64))  # 7 latents, 25 audio latents each
    first = generate_base(stack["dit"], replace(one, text=prompts[0]))
    held = dict(image_latent=first.video[:, :, -1:], audio_prefix=first.audio[:, -1:])
    second = generate_base(stack["dit"], replace(one, text=prompts[1], seed=8, **held))
    held = dict(image_latent=second.video[:, :, -1:], audio_prefix=second.audio[:, -1:])
    third = generate_base(stack["dit"], replace(one, text=prompts[1], seed=9, **held))
    by_hand_video = torch.cat([first.video, second.video[:, :, 1:], third.video[:, :, 1:]], dim=2)
    by_hand_audio = torch.cat([first.audio, second.audio[:, 1:], third.audio[:, 1:]], dim=1)
    assert torch.equal(long.video, by_hand_video) and torch.equal(long.audio, by_hand_audio)


def test_overlap_frames_are_the_previous_windows_frames_at_every_call(stack):
    window = WindowSettings(0.96, 2)
    model = Recorder(stack["dit"])
    long = generate_long(model, request(windows=window, steps=3))
    windows = plan_windows(SIZE, window)
    assert len(windows) == 4 and len(model.calls) == 4 * 3
    for w in windows[1:]:
        held = long.video[:, :, w.start : w.start + w.held]  # the previous window's last frames, as it ended
        held_audio = long.audio[:, w.audio_start : w.audio_start + w.held_audio]
        for video, audio, _ in model.calls[3 * w.index : 3 * w.index + 3]:
            assert video.shape[2] == w.size.latent_frames
            assert torch.equal(video[:, :, : w.held], held) and torch.equal(
                audio[:, : w.held_audio], held_audio
            )
        assert not torch.equal(model.calls[3 * w.index][0][:, :, w.held], long.video[:, :, w.start + w.held])


def test_driving_audio_slices_the_sound_and_the_clip_keeps_it_sample_accurate(stack):
    audio_vae, size = stack["audio_vae"], SIZE
    latent, waveform = driving_audio(audio_vae, tone(3.5), size, WINDOW)  # longer audio: cut to the clip
    assert latent.shape == (1, size.audio_frames, 64) and waveform.shape == (1, 2, 2048 * size.audio_frames)
    model = Recorder(stack["dit"])
    long = generate_long(model, request(audio=(latent, waveform)))
    assert torch.equal(long.audio, latent) and long.source_audio is waveform
    for w in plan_windows(size, WINDOW):  # each window hears exactly its slice, clean, at every step
        piece = latent[:, w.audio_start : w.audio_start + w.size.audio_frames]
        assert all(torch.equal(call[1], piece) for call in model.calls[2 * w.index : 2 * w.index + 2])
        alone = audio_vae.encode(
            waveform[..., 2048 * w.audio_start : 2048 * (w.audio_start + w.size.audio_frames)]
        )
        assert torch.equal(piece[:, w.held_audio :], alone[:, w.held_audio :])  # its slice, encoded alone

    frames, sound = decode(long, stack["turbo"], None)
    assert frames.shape[0] == size.decoded_frames == 73
    assert sound["waveform"].shape[-1] == round(frames.shape[0] / 25 * 44100)  # same duration, to the sample
    assert torch.equal(sound["waveform"], to_audio(from_audio(tone(3.5), size.audio_frames))["waveform"])
    # Audio exactly as long as the clip (73 frames = 2.92 s): the sound that comes out is the input itself,
    # after the pack's FFT resampling to 51.2 kHz and back.
    exact = tone(2.92)
    latent, waveform = driving_audio(audio_vae, exact, size, WINDOW)
    _, sound = decode(replace(long, audio=latent, source_audio=waveform), stack["turbo"], None)
    assert sound["waveform"].shape == exact["waveform"].shape
    assert torch.allclose(sound["waveform"], exact["waveform"], atol=1e-5)


def test_long_clip_without_driving_audio_decodes_to_matching_lengths(stack):
    from magihuman.pipeline.codecs.audio_vae import SAMPLE_RATE

    size = clip_size(3.0, 64, 64)  # ends inside a latent: the last window is short
    long = generate_long(stack["dit"], request(size=size))
    assert long.video.shape[2] == size.latent_frames and long.audio.shape[1] == size.audio_frames
    frames, sound = decode(long, stack["turbo"], stack["audio_vae"])
    assert sound["waveform"].shape[-1] == round(frames.shape[0] / 25 * 44100) and SAMPLE_RATE == 51200


def test_windowed_super_resolution_holds_the_previous_windows_frames(stack):
    base = generate_long(stack["dit"], request())
    sr_size = clip_size(SIZE.seconds, 128, 128)
    model = Recorder(stack["sr_dit"])
    sr = SRRequest(size=sr_size, text=embedding(0), seed=3, windows=WINDOW, settings=SRSettings(steps=2))
    long = generate_long_sr(model, base, sr)
    assert long.video.shape == (1, 48, SIZE.latent_frames, 8, 8) and torch.equal(long.audio, base.audio)
    steps = sr.settings.steps
    for w in plan_windows(sr_size, WINDOW)[1:]:
        held = long.video[:, :, w.start : w.start + 1]
        assert all(
            torch.equal(call[0][:, :, :1], held)
            for call in model.calls[steps * w.index : steps * (w.index + 1)]
        )


def test_progress_counts_windows_and_steps_and_cancel_stops_between_windows(stack):
    seen, windows = [], []
    hooks = Hooks(on_step=lambda i, n, *_: seen.append((i, n)), on_window=lambda i, n: windows.append((i, n)))
    generate_long(stack["dit"], request(hooks=hooks))
    assert windows == [(1, 3), (2, 3), (3, 3)] and seen == [(i, 6) for i in range(1, 7)]

    class Cancelled(Exception):
        pass

    def cancel_in_window_two():
        if windows and windows[-1][0] == 2:
            raise Cancelled

    windows.clear()
    model = Recorder(stack["dit"])
    hooks = Hooks(check_cancel=cancel_in_window_two, on_window=lambda i, n: windows.append((i, n)))
    with pytest.raises(Cancelled):
        generate_long(model, request(hooks=hooks))
    assert len(model.calls) == 2 and windows == [(1, 3), (2, 3)]  # window 1 ran whole, window 2 not at all


def test_cli_generate_past_one_window_makes_one_lip_synced_clip(stack, tmp_path):

    write_wav(tmp_path / "voice.wav", tone(2.92))  # 73 frames: the whole clip
    args = ["generate", "--models-dir", str(stack["models"]), "--prompt", "a woman says hello",
            "--out", str(tmp_path / "long"), "--seconds", "2.88", "--width", "64", "--height", "64",
            "--window-seconds", "0.96", "--window-prompt", "a woman smiles", "--window-prompt", "she waves",
            "--audio", str(tmp_path / "voice.wav"), "--steps", "2"]  # fmt: skip
    assert load_cli().main(args) == 0
    info = streams(tmp_path / "long.mp4")
    assert info["frames"] == SIZE.decoded_frames == 73
    assert abs(info["audio_seconds"] - info["video_seconds"]) < 0.05  # one AAC frame is 0.023 s
    out, given = read_audio(tmp_path / "long.wav"), read_audio(tmp_path / "voice.wav")
    assert out["waveform"].shape == given["waveform"].shape  # 2.92 s at 44.1 kHz, to the sample
    assert (out["waveform"] - given["waveform"]).abs().max() < 2e-4  # 16-bit wav steps are 3e-5


@pytest.mark.parametrize(
    "extra, message",
    [(["--window-seconds", "1"], "window seconds must be a multiple of 0.16"),
     (["--overlap", "9"], "window overlap must be"), (["--seconds", "700"], "at most 600"),
     (["--image", "face.png", "--overlap", "6"], "one slot going to the reference image")],
)  # fmt: skip
def test_cli_bad_window_arguments_fail_with_a_clear_message(stack, tmp_path, capsys, extra, message):
    args = [
        "generate",
        "--models-dir",
        str(stack["models"]),
        "--prompt",
        "hello",
        "--out",
        str(tmp_path / "x"),
    ]
    assert load_cli().main([*args, "--window-seconds", "0.96", *extra]) == 1
    assert message in capsys.readouterr().err


def test_the_sound_of_a_long_clip_decodes_in_chunks_as_in_one_piece(stack):
    latent = torch.randn(1, 151, 64, generator=torch.Generator().manual_seed(0))
    whole = stack["audio_vae"].decode(latent)
    chunked = decode_audio(stack["audio_vae"], latent, chunk=20)  # 8 chunks with 32 latents of context
    assert chunked.shape == whole.shape == (1, 2, 2048 * 151)
    assert torch.allclose(chunked, whole, atol=1e-5 * whole.abs().max().item())


class FrameCounter:
    """A stand-in video decoder: black frames, as many as the Turbo VAE gives (4·latent frames − 3)."""

    def decode(self, latent):
        return torch.zeros(1, 3, 4 * latent.shape[2] - 3, 8, 8)


class MeanEncoder:
    """A stand-in audio encoder, fast at any length: each latent is its 2048 samples' mean (both channels
    repeated to 64), so a latent names the stretch of sound it came from."""

    def encode(self, waveform):
        means = waveform.unfold(-1, 2048, 2048).mean(-1)  # [1, 2, A]
        return means.transpose(1, 2).repeat(1, 1, 32)  # [1, A, 64]


def test_a_minute_of_driving_audio_gives_a_minute_of_clip_with_that_sound():
    # The sound path at full length, with stand-ins for the models (the real ones are slow on a CPU at 60 s;
    # the tests above run them on short clips): 60 s -> 1501 frames = 4·376 − 3 decoded, 1501 audio latents.
    voice = tone(60.04)
    size = clip_size(60.0, 64, 64)
    latent, waveform = driving_audio(MeanEncoder(), voice, size)  # default windows: 13 of 4.96 s
    assert torch.allclose(latent, MeanEncoder().encode(waveform), atol=1e-6)  # the slices tile the audio
    calls = []

    def model(video, audio, text):
        calls.append(audio)
        return torch.zeros_like(video), torch.zeros_like(audio)

    long = generate_long(model, request(size=size, windows=WindowSettings(), audio=(latent, waveform)))
    assert len(calls) == 13 * 2 and long.video.shape[2] == 376 and torch.equal(long.audio, latent)
    frames, sound = decode(long, FrameCounter(), None)
    assert frames.shape[0] == 1501 and sound["waveform"].shape == voice["waveform"].shape  # 60.04 s both
    assert torch.allclose(sound["waveform"], voice["waveform"], atol=1e-5)


def test_a_long_clip_decodes_one_window_at_a_time_into_the_same_mp4(stack, tmp_path, monkeypatch):
    from magihuman.pipeline.codecs.wan_vae import load_wan_vae

    latent = MagiLatent(torch.randn(1, 48, 19, 4, 4), torch.randn(1, 77, 64), 2.88)
    frames, sound = decode(latent, stack["turbo"], stack["audio_vae"])
    pieces, streamed_sound = decode_stream(latent, stack["turbo"], stack["audio_vae"])
    pieces = list(pieces)
    assert [p.shape[0] for p in pieces] == [25, 28, 20]  # latents 7, 7, 5 (padded to 7, its padding cut)
    assert torch.equal(torch.cat(pieces), frames) and frames.shape == (73, 64, 64, 3)
    assert torch.equal(streamed_sound["waveform"], sound["waveform"])
    pictures = record_pictures(monkeypatch)
    whole = write_mp4(tmp_path / "whole.mp4", frames, sound)
    whole_pictures = pictures[:]
    pictures.clear()
    streamed = write_mp4(tmp_path / "streamed.mp4", iter(pieces), sound)
    assert len(whole_pictures) == 73
    assert_same_clip(whole_pictures, whole, pictures, streamed)

    wan = load_wan_vae(stack["models"] / "vae" / "Wan2.2_VAE.pth", dtype=torch.float32)
    short = replace(latent, video=latent.video[:, :, :3])
    frames, _ = decode(short, wan, stack["audio_vae"])
    pieces, _ = decode_stream(short, wan, stack["audio_vae"])
    pieces = list(pieces)
    assert [p.shape[0] for p in pieces] == [1, 4, 4]  # one latent frame at a time (causal cache)
    assert torch.equal(torch.cat(pieces), frames)
