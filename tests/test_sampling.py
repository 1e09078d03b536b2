"""Sampling behaviour on fake models: guidance arithmetic, held audio, image stitching, hooks, cancel, seeds,
batched guidance, and the size/length rules that run before any model does."""

import pytest
import torch
from magihuman.pipeline.sampling.latent import MagiLatent
from magihuman.pipeline.sampling.loops import (
    Guidance,
    Hooks,
    LoopOptions,
    initial_noise,
    sample_distilled,
    sample_guided,
)
from magihuman.pipeline.sampling.scheduler import flow_schedule
from magihuman.pipeline.sampling.sizes import clip_size
from magihuman.pipeline.sampling.super_resolution import SRGuidance, SRSettings, sample_sr

COND = torch.full((1, 3, 3584), 1.0)
UNCOND = torch.full((1, 5, 3584), -1.0)


class Recorder:
    """v = 0.1·x + c for video and 0.2·x + c for audio, where c is the text's mean (+1 cond, −1 uncond)."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, audio, text):
        self.calls.append((video.clone(), audio.clone(), text))
        c = text.mean()
        return 0.1 * video + c, 0.2 * audio + c


class Batched(Recorder):
    def __init__(self):
        super().__init__()
        self.batched = 0

    def forward_many(self, samples):
        self.batched += 1
        return [Recorder.__call__(self, *sample) for sample in samples]


def noise(seed=0, seconds=1.0, size=(64, 64)):
    return initial_noise(clip_size(seconds, *size), torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_guidance_switches_the_video_scale_at_t_500_and_keeps_audio_at_5():
    video, audio = noise()
    model = Recorder()
    scales = []
    guidance = Guidance()
    original_mix = guidance.mix

    def spy(cond, uncond, t):
        mixed = original_mix(cond, uncond, t)
        # v = u + s(c − u): with c − u = 2 everywhere, the scale is recovered from the mixed velocity.
        scales.append(
            (
                t,
                ((mixed[0] - uncond[0]) / (cond[0] - uncond[0])).mean().item(),
                ((mixed[1] - uncond[1]) / (cond[1] - uncond[1])).mean().item(),
            )
        )
        return mixed

    object.__setattr__(guidance, "mix", spy)
    sample_guided(model, video, audio, (COND, UNCOND), steps=32, guidance=guidance)
    assert len(model.calls) == 64
    assert [call[2] is COND for call in model.calls[:4]] == [True, False, True, False]
    timesteps = flow_schedule(32).timesteps.tolist()
    assert [t for t, *_ in scales] == timesteps
    for t, video_scale, audio_scale in scales:
        assert video_scale == pytest.approx(5.0 if t > 500 else 2.0, abs=1e-4)
        assert audio_scale == pytest.approx(5.0, abs=1e-4)
    assert sum(1 for t, *_ in scales if t <= 500) == 5  # t = 480, 416, 340, 249, 138


def test_custom_scales_reach_the_mix():
    cond = (torch.ones(2), torch.ones(2))
    uncond = (torch.zeros(2), torch.zeros(2))
    guidance = Guidance(video_scale=7.0, video_scale_late=3.0, switch_t=800, audio_scale=1.5)
    assert guidance.mix(cond, uncond, 801)[0].tolist() == [7.0, 7.0]
    assert guidance.mix(cond, uncond, 800)[0].tolist() == [3.0, 3.0]
    assert guidance.mix(cond, uncond, 900)[1].tolist() == [1.5, 1.5]


def test_batched_guidance_equals_two_calls():
    video, audio = noise()
    model = Batched()
    batched = sample_guided(model, video, audio, (COND, UNCOND), steps=4, options=LoopOptions(batch_cfg=True))
    assert model.batched == 4
    sequential = sample_guided(Recorder(), video, audio, (COND, UNCOND), steps=4)
    for a, b in zip(batched, sequential, strict=True):
        assert torch.equal(a, b)


def test_driving_audio_stays_clean_at_every_call_and_at_the_end():
    user_audio = torch.randn(1, 26, 64)
    video, audio = initial_noise(
        clip_size(1.0, 64, 64), torch.Generator().manual_seed(0), torch.device("cpu"), user_audio
    )
    assert audio is user_audio
    for run in (
        lambda m: sample_distilled(
            m, video, audio, COND, torch.Generator().manual_seed(1), options=LoopOptions(hold_audio=True)
        ),
        lambda m: sample_guided(
            m, video, audio, (COND, UNCOND), steps=6, options=LoopOptions(hold_audio=True)
        ),
    ):
        model = Recorder()
        _, final_audio = run(model)
        assert all(torch.equal(call[1], user_audio) for call in model.calls)
        assert torch.equal(final_audio, user_audio)


def test_reference_image_is_frame_zero_at_every_call_and_at_the_end():
    video, audio = noise()
    image = torch.randn(1, 48, 1, 4, 4)
    for run in (
        lambda m: sample_distilled(
            m, video, audio, COND, torch.Generator().manual_seed(1), options=LoopOptions(image)
        ),
        lambda m: sample_guided(m, video, audio, (COND, UNCOND), steps=5, options=LoopOptions(image)),
        lambda m: sample_sr(
            m,
            video,
            audio,
            (COND, None),
            (8, 8),
            torch.Generator().manual_seed(1),
            options=LoopOptions(torch.randn(1, 48, 1, 8, 8)),
        ),
    ):
        model = Recorder()
        out = run(model)
        out_video = out[0] if isinstance(out, tuple) else out
        first = model.calls[0][0][:, :, :1]
        assert all(torch.equal(call[0][:, :, :1], first) for call in model.calls)
        assert torch.equal(out_video[:, :, :1], first)


def test_same_seed_same_result_other_seed_other_result():
    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        video, audio = initial_noise(clip_size(1.0, 64, 64), generator, torch.device("cpu"))
        return sample_distilled(Recorder(), video, audio, COND, generator)

    assert all(torch.equal(a, b) for a, b in zip(run(7), run(7), strict=True))
    assert not torch.equal(run(7)[0], run(8)[0])


def test_hooks_report_every_step_with_clean_estimates():
    video, audio = noise()
    seen = []
    stages = []
    hooks = Hooks(
        on_step=lambda i, n, v, a: seen.append((i, n, v.shape, a.shape)),
        on_stage=lambda name, s: stages.append(name),
    )
    sample_distilled(
        Recorder(), video, audio, COND, torch.Generator().manual_seed(0), options=LoopOptions(hooks=hooks)
    )
    assert [(i, n) for i, n, *_ in seen] == [(i, 8) for i in range(1, 9)]
    assert seen[0][2] == video.shape and seen[0][3] == audio.shape
    assert stages == ["distilled sampling"]


def test_last_step_estimate_is_the_result():
    video, audio = noise()
    estimates = []
    out = sample_distilled(
        Recorder(),
        video,
        audio,
        COND,
        torch.Generator().manual_seed(0),
        options=LoopOptions(hooks=Hooks(on_step=lambda i, n, v, a: estimates.append(v))),
    )
    assert torch.equal(estimates[-1], out[0])  # σ_N = 0: the final step returns the clean estimate


class Cancelled(BaseException):
    pass


def test_cancel_stops_before_the_next_forward():
    video, audio = noise()
    model = Recorder()
    budget = iter(range(3))

    def check():
        if next(budget, None) is None:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_guided(
            model,
            video,
            audio,
            (COND, UNCOND),
            steps=32,
            options=LoopOptions(hooks=Hooks(check_cancel=check)),
        )
    assert len(model.calls) == 3  # cond+uncond of step 1, cond of step 2, then nothing


def test_sr_guidance_scales_per_frame():
    scales = SRGuidance().frame_scales(16)
    assert scales.shape == (1, 1, 16, 1, 1)
    assert (
        scales[0, 0, :13].flatten().tolist() == [2.0] * 13
        and scales[0, 0, 13:].flatten().tolist() == [3.5] * 3
    )
    assert SRGuidance(scale=1.5).frame_scales(4).flatten().tolist() == [1.5] * 4  # the cap never raises it
    with pytest.raises(ValueError, match="negative prompt"):
        sample_sr(
            Recorder(), *noise(), (COND, None), (8, 8), torch.Generator(), SRSettings(guidance=SRGuidance())
        )


def test_sizes_and_lengths_follow_the_official_rules():
    size = clip_size(5, 448, 256)
    assert (size.frames, size.latent_frames, size.audio_frames, size.decoded_frames) == (126, 32, 126, 125)
    assert (size.latent_width, size.latent_height) == (28, 16)
    four = clip_size(4, 480, 272)
    assert (four.frames, four.latent_frames, four.decoded_frames, four.height) == (101, 26, 101, 256)
    assert clip_size(2.4, 1920, 1088).audio_frames == 61


@pytest.mark.parametrize(
    "seconds, width, height, message",
    [
        (0, 448, 256, "seconds must be more than 0"),
        (-1, 448, 256, "seconds must be more than 0"),
        (float("nan"), 448, 256, "seconds must be more than 0"),
        (1.01, 448, 256, "multiple of 1/25"),
        (4, 7, 256, "width must be a whole number of pixels from 64"),
        (4, 448, 100000, "height must be a whole number of pixels"),
        (4, 448.5, 256, "width must be a whole number"),
    ],
)
def test_bad_sizes_fail_before_any_model_runs(seconds, width, height, message):
    with pytest.raises(ValueError, match=message):
        clip_size(seconds, width, height)


def test_bad_step_counts_fail_before_any_model_runs():
    def model(*args):
        raise AssertionError("the model must not run")

    video, audio = noise()
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be a whole number"):
            sample_distilled(model, video, audio, COND, torch.Generator(), steps=steps)
        with pytest.raises(ValueError, match="steps must be a whole number"):
            sample_guided(model, video, audio, (COND, UNCOND), steps=steps)


def test_snapping_warns_and_rounds_down(caplog):
    with caplog.at_level("WARNING"):
        size = clip_size(4, 500, 300)
    assert (size.width, size.height) == (480, 288)
    assert "width 500 is not a multiple of 32: using 480" in caplog.text


def test_latent_container_carries_its_metadata():
    video, audio = noise(seconds=2.0, size=(128, 96))
    latent = MagiLatent(video, audio, seconds=2.0)
    assert (latent.width, latent.height, latent.fps, latent.stage) == (128, 96, 25, "base")
    sr = latent.with_video(torch.zeros(1, 48, 13, 12, 16), "sr")
    assert (sr.width, sr.height, sr.stage) == (256, 192, "sr") and sr.audio is latent.audio
    with pytest.raises(ValueError, match="MagiLatent needs video"):
        MagiLatent(audio, video, seconds=2.0)
