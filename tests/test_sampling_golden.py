"""Schedules, solvers and whole sampling runs against the official scheduler and ``MagiEvaluator.evaluate``
(golden ``scheduler`` case: toy velocity fields instead of the DiT, every RNG draw recorded).

Tolerance. The stage functions redo the official float32 arithmetic operation for operation and draw from a
CPU generator exactly as the official global RNG did, so most values match bitwise. What is not bitwise is
the corrector's 2×2 ``linalg.solve``: LAPACK on this CPU rounds its last bit differently from the machine
that recorded the fixtures, which moves later steps by ~1e-9..1e-6 (measured). Trajectories are therefore
compared at 1e-5 absolute (latents have |x| ≲ 5); the re-noising sampler and the SR re-noise, which solve
nothing, are compared bitwise.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import FIXTURES
from magihuman.pipeline.sampling.loops import (
    Guidance,
    LoopOptions,
    initial_noise,
    sample_distilled,
    sample_guided,
)
from magihuman.pipeline.sampling.scheduler import Renoise, UniPC, flow_schedule
from magihuman.pipeline.sampling.super_resolution import (
    SRGuidance,
    SRSettings,
    noisy_audio,
    renoise,
    sample_sr,
    zero_snr_sqrt_alphas,
)
from safetensors.torch import load_file

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "scheduler" / "tensors.safetensors")


class ToyModel:
    """The fixture's toy velocity: v = k·x + R(shape) + 0.25·mean(text), for video and audio alike; records
    every input it is called with."""

    def __init__(self, golden, k: float):
        self.golden, self.k, self.calls = golden, k, []

    def __call__(self, video, audio, text):
        self.calls.append((video.clone(), audio.clone(), text))
        shift = 0.25 * text.float().mean()
        r = lambda x: self.golden["evaluate.R." + "x".join(map(str, x.shape))]  # noqa: E731
        return self.k * video + r(video) + shift, self.k * audio + r(audio) + shift


@pytest.mark.parametrize("steps", [32, 8, 5])
def test_schedules_equal_the_official_tables(golden, steps):
    schedule = flow_schedule(steps)
    assert torch.equal(schedule.timesteps, golden[f"table.N{steps}.timesteps"])
    assert torch.equal(schedule.sigmas, golden[f"table.N{steps}.sigmas"])


def test_any_step_count_follows_the_same_rule():
    schedule = flow_schedule(50, shift=3.0)
    assert schedule.steps == 50 and schedule.sigmas[-1] == 0 and schedule.timesteps[0] == 999
    assert torch.all(schedule.sigmas[1:] < schedule.sigmas[:-1])  # strictly decreasing to 0


@pytest.mark.parametrize("name, steps, audio_moves", [("unipc32", 32, True), ("sr_unipc5", 5, False)])
def test_unipc_trajectories(golden, name, steps, audio_moves):
    schedule = flow_schedule(steps)
    video, audio = golden["traj.init_video"], golden["traj.init_audio"]
    video_solver, audio_solver = UniPC(schedule), UniPC(schedule)
    for i in range(steps):
        velocity_video = 0.5 * video + golden["traj.R_video"]
        velocity_audio = 0.5 * audio + golden["traj.R_audio"]
        video = video_solver.step(velocity_video, i, video)
        if audio_moves:
            audio = audio_solver.step(velocity_audio, i, audio)
        torch.testing.assert_close(video, golden[f"traj.{name}.video.{i + 1}"], rtol=0, atol=ATOL)
        torch.testing.assert_close(audio, golden[f"traj.{name}.audio.{i + 1}"], rtol=0, atol=ATOL)


def test_distilled_renoise_trajectory_is_bitwise(golden):
    schedule = flow_schedule(8)
    generator = torch.Generator().manual_seed(1000)  # the fixture seeded the global CPU RNG with 1000
    video, audio = golden["traj.init_video"], golden["traj.init_audio"]
    video_solver, audio_solver = Renoise(schedule, generator), Renoise(schedule, generator)
    for i in range(8):
        velocity_video = 0.5 * video + golden["traj.R_video"]
        velocity_audio = 0.5 * audio + golden["traj.R_audio"]
        video = video_solver.step(velocity_video, i, video)  # video noise first, then audio: official order
        audio = audio_solver.step(velocity_audio, i, audio)
        assert torch.equal(video, golden[f"traj.ddim8.video.{i + 1}"])
        assert torch.equal(audio, golden[f"traj.ddim8.audio.{i + 1}"])


def test_zero_snr_value_and_sr_renoise_are_bitwise(golden):
    table = zero_snr_sqrt_alphas()
    # float64 linspace is vectorized differently per CPU (FMA or not): 172 of 1000 entries land one float32
    # ulp apart from the recorded table; the entry the pipeline uses (220) is identical.
    torch.testing.assert_close(table, golden["zerosnr.table"], rtol=0, atol=1.2e-7)
    assert table[220] == golden["zerosnr.table"][220]
    assert table[220].item() == pytest.approx(0.8389104, abs=1e-7)
    assert (1 - table[220] ** 2).sqrt().item() == pytest.approx(0.5442696, abs=1e-7)
    replay = SimpleNamespace(randn=iter([golden["renoise.noise"], golden["renoise.audio_noise"]]))
    generator = torch.Generator()

    def recorded(shape, generator, device, dtype):
        return next(replay.randn)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", recorded)
        result = renoise(golden["renoise.base_latent"], 8, 12, generator)
        audio = noisy_audio(golden["renoise.audio_base"], generator)
    assert torch.equal(result, golden["renoise.result"])
    assert torch.equal(audio, golden["renoise.audio_result"])


def fixture_size():
    """The fixture's clip: fps 4 x 2 s -> 9 audio latents, 3 latent frames of 4x6 (96x64 pixels)."""
    return SimpleNamespace(audio_shape=lambda: (1, 9, 64), video_shape=lambda: (1, 48, 3, 4, 6))


def texts(golden):
    return golden["evaluate.text_cond_raw"].float(), golden["evaluate.text_null_raw"].float()


def assert_stage(golden, run, stage, video, audio):
    torch.testing.assert_close(video, golden[f"evaluate.{run}.stage{stage}.out_video"], rtol=0, atol=ATOL)
    torch.testing.assert_close(audio, golden[f"evaluate.{run}.stage{stage}.out_audio"], rtol=0, atol=ATOL)


def test_base_stage_then_sr_with_reference_image(golden):
    run = "base_sr_ti2v"
    cond, null = texts(golden)
    generator = torch.Generator().manual_seed(2000)
    video, audio = initial_noise(fixture_size(), generator, torch.device("cpu"))
    assert torch.equal(audio, golden[f"evaluate.{run}.rng.000"]) and torch.equal(
        video, golden[f"evaluate.{run}.rng.001"]
    )
    base = ToyModel(golden, 0.5)
    image = golden["evaluate.image_latent_br"]
    video, audio = sample_guided(base, video, audio, (cond, null), steps=32, options=LoopOptions(image))
    assert len(base.calls) == 64 and [c[2] is null for c in base.calls[:2]] == [False, True]
    for i in range(32):  # the latent fed to the conditional forward at each step, after stitching
        torch.testing.assert_close(
            base.calls[2 * i][0], golden[f"evaluate.{run}.call{i:02d}.br.x_t"], rtol=0, atol=ATOL
        )
        torch.testing.assert_close(
            base.calls[2 * i][1], golden[f"evaluate.{run}.call{i:02d}.br.audio_x_t"], rtol=0, atol=ATOL
        )
    assert_stage(golden, run, 0, video, audio)
    assert torch.equal(video[:, :, :1], image[:, :, :1])

    sr = ToyModel(golden, 0.6)
    sr_image = golden["evaluate.image_latent_sr"]
    sr_video = sample_sr(sr, video, audio, (cond, None), (8, 12), generator, options=LoopOptions(sr_image))
    torch.testing.assert_close(
        sr.calls[0][0][:, :, 1:], golden[f"evaluate.{run}.stage1.in_video"][:, :, 1:], rtol=0, atol=ATOL
    )
    torch.testing.assert_close(sr.calls[0][1], golden[f"evaluate.{run}.stage1.in_audio"], rtol=0, atol=ATOL)
    assert all(torch.equal(call[1], sr.calls[0][1]) for call in sr.calls)  # the SR audio input never moves
    for i in range(5):
        torch.testing.assert_close(
            sr.calls[i][0], golden[f"evaluate.{run}.call{32 + i:02d}.sr.x_t"], rtol=0, atol=ATOL
        )
    torch.testing.assert_close(sr_video, golden[f"evaluate.{run}.final_video"], rtol=0, atol=ATOL)
    torch.testing.assert_close(audio, golden[f"evaluate.{run}.final_audio"], rtol=0, atol=ATOL)  # base audio


def test_distilled_text_to_video(golden):
    run = "distill_t2v"
    cond, _ = texts(golden)
    generator = torch.Generator().manual_seed(2000)
    video, audio = initial_noise(fixture_size(), generator, torch.device("cpu"))
    model = ToyModel(golden, 0.5)
    video, audio = sample_distilled(model, video, audio, cond, generator, steps=8)
    assert len(model.calls) == 8
    for i in range(8):
        assert torch.equal(model.calls[i][0], golden[f"evaluate.{run}.call{i:02d}.br.x_t"])
        assert torch.equal(model.calls[i][1], golden[f"evaluate.{run}.call{i:02d}.br.audio_x_t"])
    assert torch.equal(video, golden[f"evaluate.{run}.final_video"])
    assert torch.equal(audio, golden[f"evaluate.{run}.final_audio"])


def test_base_stage_then_sr_with_guidance_and_the_cfg_trick(golden):
    run = "base_srcfg_t2v"
    cond, null = texts(golden)
    generator = torch.Generator().manual_seed(2000)
    video, audio = initial_noise(fixture_size(), generator, torch.device("cpu"))
    video, audio = sample_guided(
        ToyModel(golden, 0.5), video, audio, (cond, null), steps=32, guidance=Guidance()
    )
    assert_stage(golden, run, 0, video, audio)
    sr = ToyModel(golden, 0.6)
    guidance = SRGuidance(scale=3.5, trick_frames=2, trick_value=2.0)  # fixture: cfg_trick_start_frame=2
    sr_video = sample_sr(sr, video, audio, (cond, null), (8, 12), generator, SRSettings(guidance=guidance))
    assert len(sr.calls) == 10
    torch.testing.assert_close(sr_video, golden[f"evaluate.{run}.final_video"], rtol=0, atol=ATOL)
    torch.testing.assert_close(audio, golden[f"evaluate.{run}.final_audio"], rtol=0, atol=ATOL)
