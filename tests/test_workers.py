"""The DiT loader's ``gpus`` input on the CPU: this process is rank 0 and worker processes (gloo) are the
other ranks, as ComfyUI would run it (tests/fake_comfy), on the tiny demo distilled DiT.

Tolerance: as in test_dit_parallel.py, a rank's GEMMs have fewer rows than one process's and sum in another
order, so bf16 values may flip by an ulp; a whole distilled run stays within 3e-2 of the single process.
Mixed-up rows or heads between ranks move the result by O(1)."""

import gc
import os
import signal

import pytest
import torch
from magihuman.pipeline.workers import WorkerError

pytest_plugins = ["comfy_fixtures"]


def run(comfy, name, **inputs):
    return next(n for n in comfy.nodes.NODES if n.__name__ == name).execute(**inputs).result


def load(comfy, gpus: int):
    inputs = dict(model="distill_fp8/", variant="auto", compute="auto", attention="sdpa", swap_layers=0)
    return run(comfy, "DiTLoader", **inputs, gpus=gpus)[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cond(comfy):
    (encoder,) = run(
        comfy, "TextEncoderLoader", text_encoder="t5gemma-9b-9b-ul2/", weights="bf16", device="gpu"
    )
    return run(comfy, "TextEncode", text_encoder=encoder, prompt="a man waves", negative_prompt="static")[0]


@pytest.fixture(scope="module")
def two(comfy):
    dit = load(comfy, 2)
    yield dit
    dit.workers.shutdown()


def sample(comfy, dit, cond):
    inputs = dict(dit=dit, conditioning=cond, seconds=0.96, width=64, height=64, seed=3, steps=4, shift=5.0)
    return run(comfy, "DistillSampler", **inputs)[0]


@pytest.fixture(scope="module")
def reference(comfy, cond):
    return sample(comfy, load(comfy, 1), cond)


def assert_matches(latent, reference):
    torch.testing.assert_close(latent.video, reference.video, rtol=0, atol=3e-2)
    torch.testing.assert_close(latent.audio, reference.audio, rtol=0, atol=3e-2)


def on_step(comfy, monkeypatch, step: int, action):
    """Run ``action`` in rank 0's progress hook after ``step`` (the preview is drawn there)."""
    progress = comfy.nodes.progress
    preview = progress.preview
    calls = []

    def hooked(video):
        calls.append(1)
        if len(calls) == step:
            action()
        return preview(video)

    monkeypatch.setattr(progress, "preview", hooked)
    return calls


def test_gpus_one_has_no_workers_and_the_input_is_optional_and_last(comfy):
    inputs = comfy.nodes.loaders.DiTLoader.define_schema().inputs
    assert inputs[-1].id == "gpus" and inputs[-1].optional and inputs[-1].default == 1
    assert "replica" in inputs[-1].tooltip and "14.3 GiB" in inputs[-1].tooltip
    assert load(comfy, 1).workers is None


def test_two_processes_sample_what_one_does_and_the_workers_stay(comfy, two, cond, reference):
    pids = two.workers.pids()
    assert len(pids) == 1 and pids[0] != os.getpid() and "on 2 devices" in two.description
    assert_matches(sample(comfy, two, cond), reference)
    assert two.workers.pids() == pids and alive(pids[0])  # kept for the next run
    assert_matches(sample(comfy, two, cond), reference)


def test_super_resolution_on_two_processes_matches_one(comfy, cond, reference):
    inputs = dict(model="540p_sr_fp8/", variant="auto", compute="auto", attention="sdpa", swap_layers=0)
    results = []
    for gpus in (1, 2):
        sr_dit = run(comfy, "DiTLoader", **inputs, gpus=gpus)[0]
        (sr,) = run(comfy, "SuperResolution", sr_dit=sr_dit, latent=reference, conditioning=cond,
                    target={"target": "custom", "width": 128, "height": 96}, seed=2, steps=3, shift=5.0,
                    noise_index=220, audio_noise_scale=0.7, sr_cfg=1.0, cfg_trick_frames=13,
                    cfg_trick_value=2.0)  # fmt: skip
        results.append(sr)
        if sr_dit.workers is not None:
            sr_dit.workers.shutdown()
    assert results[1].video.shape == (1, 48, 7, 6, 8)
    torch.testing.assert_close(results[1].video, results[0].video, rtol=0, atol=3e-2)


def test_cancel_stops_every_rank_and_the_next_run_works(comfy, two, cond, reference, monkeypatch):
    pids = two.workers.pids()
    calls = on_step(comfy, monkeypatch, 2, lambda: comfy.mm.interrupt_current_processing(True))
    with pytest.raises(comfy.mm.InterruptProcessingException):
        sample(comfy, two, cond)
    assert len(calls) == 2  # stopped at the next model call, not at the end
    monkeypatch.undo()
    assert two.workers.pids() == pids  # the workers went back to waiting
    assert_matches(sample(comfy, two, cond), reference)


def test_a_killed_worker_ends_the_run_clearly_and_the_next_run_starts_fresh_workers(
    comfy, two, cond, reference, monkeypatch
):
    (pid,) = two.workers.pids()
    on_step(comfy, monkeypatch, 2, lambda: os.kill(pid, signal.SIGKILL))
    with pytest.raises(WorkerError) as error:
        sample(comfy, two, cond)
    message = str(error.value)
    for words in (f"worker 1 (process {pid}, cpu)", "exited with code -9", "next run starts fresh", "gpus"):
        assert words in message
    assert not two.workers.started and not alive(pid)
    monkeypatch.undo()
    assert_matches(sample(comfy, two, cond), reference)
    assert two.workers.pids() != [pid]


def test_a_stuck_worker_ends_the_run_after_the_group_timeout(comfy, two, cond, reference, monkeypatch):
    two.workers.timeout_s = 5.0  # the node's default is 120 s; taken by the next run's group
    (pid,) = two.workers.pids()
    on_step(comfy, monkeypatch, 2, lambda: os.kill(pid, signal.SIGSTOP))
    try:
        with pytest.raises(WorkerError) as error:
            sample(comfy, two, cond)
    finally:
        two.workers.timeout_s = 120.0
    for words in (
        f"worker 1 (process {pid}, cpu) is still running but stopped answering",
        "next run starts fresh",
    ):
        assert words in str(error.value)
    assert not two.workers.started and not alive(pid)  # the stopped process was killed
    monkeypatch.undo()
    assert_matches(sample(comfy, two, cond), reference)


def test_shutdown_and_garbage_collection_leave_no_live_worker(comfy, two):
    two.workers.start()
    two.workers.wait_ready()
    pids = two.workers.pids()
    two.workers.shutdown()
    assert pids and not any(alive(p) for p in pids)
    dit = load(comfy, 2)
    pids = dit.workers.pids()
    assert alive(pids[0])
    del dit
    gc.collect()  # the unloaded model's pool is collected and its finalizer stops the workers
    assert not any(alive(p) for p in pids)
