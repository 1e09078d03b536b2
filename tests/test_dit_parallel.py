"""Sequence and CFG parallelism on the CPU: gloo groups of 2 and 4 spawned processes (one spawn of 4 for the
whole module; the world-2 cases run on a subgroup of ranks 0 and 1) against the single-process model, on the
golden tiny checkpoints (dense v2 and 1080p-local v1) and on whole sampling runs.

Tolerance: a rank's GEMMs have fewer rows than the single process's, so the CPU sums some of them in another
order and bf16 values flip by an ulp, exactly as in batched-vs-separate calls (test_dit_parity.py); so the
same bounds apply: velocities within 3e-2 max-abs of the single process, and within the golden bf16-SDPA
bounds (6e-2 / 2e-2) of the official run. Attention that mixed up heads or rows between ranks moves the
outputs by O(1).
"""

import contextlib
import dataclasses
import datetime
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FIXTURES
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.pipeline.dit.attention import sdpa_attention
from magihuman.pipeline.dit.config import DiTConfig
from magihuman.pipeline.dit.model import MagiDiT
from magihuman.pipeline.dit.parallel import ParallelDiT, Ulysses, free_port, local_splits, shard_rows
from magihuman.pipeline.sampling.loops import LoopOptions, sample_distilled, sample_guided
from safetensors.torch import load_file

CASES = {"v2": ("dit_tiny_v2", "base", 11), "v1_local": ("dit_tiny_v1_local", "sr_1080p", 1)}
WORLD = 4
DISTILL_STEPS, GUIDED_STEPS = 8, 4


@functools.cache
def checkpoint() -> tuple[dict, dict]:
    with Checkpoint(FIXTURES / "dit_tiny_weights") as ckpt:
        return {key: ckpt.info(key).shape for key in ckpt.keys()}, {
            key: ckpt.load(key) for key in ckpt.keys()
        }


@contextlib.contextmanager
def one_thread():
    """The workers' thread count: the CPU's GEMMs sum in another order with 2 threads (4e-7 on a forward),
    which 4 guided steps amplify to 0.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build(case: str) -> MagiDiT:
    _, variant, receptive_field = CASES[case]
    shapes, state = checkpoint()
    config = dataclasses.replace(
        DiTConfig.from_shapes(shapes, variant), frame_receptive_field=receptive_field
    )
    model = MagiDiT(config, attention=sdpa_attention, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def golden_inputs(case: str):
    golden = load_file(FIXTURES / CASES[case][0] / "tensors.safetensors")
    return golden, (
        golden["input.video_latent"],
        golden["input.audio_latent"],
        golden["input.text_embedding"],
    )


def distilled_run(model) -> tuple[torch.Tensor, torch.Tensor]:
    _, (video, audio, text) = golden_inputs("v2")
    return sample_distilled(model, video, audio, text, torch.Generator().manual_seed(42), DISTILL_STEPS)


def guided_run(model, batch_cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _, (video, audio, text) = golden_inputs("v2")
    negative = torch.randn(1, 4, text.shape[2], generator=torch.Generator().manual_seed(3))
    options = LoopOptions(batch_cfg=batch_cfg)
    return sample_guided(model, video, audio, (text, negative), GUIDED_STEPS, options=options)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    # A collective that waits longer than this (a rank stuck or gone) fails the test instead of hanging it.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=WORLD, timeout=timeout)
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    results = {}
    for name in CASES:
        model = build(name)
        _, sample = golden_inputs(name)
        for world, group in ((WORLD, None), (2, pair)):
            if rank >= world:
                continue
            ulysses = Ulysses.of(group)
            video, audio = ParallelDiT(model, ulysses)(*sample)
            results[f"{name}.w{world}.video"], results[f"{name}.w{world}.audio"] = video, audio
            results[f"{name}.w{world}.bytes"] = torch.tensor(ulysses.bytes_sent)
    model = build("v2")
    for world, group in ((WORLD, None), (2, pair)):
        if rank < world:
            results[f"distill.w{world}"] = distilled_run(ParallelDiT(model, Ulysses.of(group)))
    if rank < 2:  # the loop asks for both branches at once; each rank runs one
        results["cfg.w2"] = guided_run(ParallelDiT(model, Ulysses.of(pair), cfg=True), batch_cfg=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("parallel")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_shards_cover_the_stream_in_order():
    assert shard_rows(10, 4) == [3, 3, 2, 2] and shard_rows(3, 4) == [1, 1, 1, 0]
    splits = (7, 2, 5)
    bounds = [0, 5, 9, 14]
    pieces = [local_splits(splits, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert pieces == [(5, 0, 0), (2, 2, 0), (0, 0, 5)]


def test_head_counts_that_cannot_be_split_are_refused():
    for world in (1, 2, 4, 8):
        Ulysses(0, world).check_heads(40, 8)  # MagiHuman
    Ulysses(0, 4).check_heads(8, 2)  # the tiny model: KV heads repeated
    with pytest.raises(ValueError, match="use 1, 2, 4 or 8 GPUs"):
        Ulysses(0, 3).check_heads(40, 8)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, WORLD])
def test_sequence_parallel_forward_matches_one_process(ranks, case, world):
    golden, sample = golden_inputs(case)
    with one_thread():
        video, audio = build(case)(*sample)
    for rank in range(world):  # every rank holds the whole result
        ours_video, ours_audio = ranks[rank][f"{case}.w{world}.video"], ranks[rank][f"{case}.w{world}.audio"]
        torch.testing.assert_close(ours_video, video, rtol=0, atol=3e-2)
        torch.testing.assert_close(ours_audio, audio, rtol=0, atol=3e-2)
        for ours, ref in (
            (ours_video, golden["output.video_velocity"]),
            (ours_audio, golden["output.audio_velocity"]),
        ):
            assert (ours - ref).abs().max() <= 6e-2 and (ours - ref).norm() / ref.norm() <= 2e-2


def test_world_two_sends_the_all_to_all_volume(ranks):
    """Per layer a rank sends the other rank's half of the heads of its own q, k, v rows and its half of the
    heads of the other rank's output rows (bf16), and once the velocities of its rows (fp32, padded): the
    issue's bound is 4·D·S·2 bytes per layer, a gather of the whole stream would be more."""
    _, sample = golden_inputs("v2")
    c = build("v2").config
    tokens = sample[0][0, 0].numel() // 4 + sample[1].shape[1] + sample[2].shape[1]
    rows = shard_rows(tokens, 2)
    for rank in range(2):
        qkv = rows[rank] * (c.num_heads_q + 2 * c.num_heads_kv) * c.head_dim // 2 * 2
        out = rows[1 - rank] * c.num_heads_q * c.head_dim // 2 * 2
        sent = int(ranks[rank]["v2.w2.bytes"]) - c.num_layers * (qkv + out)
        assert 0 < sent <= max(rows) * (c.video_in_channels + c.audio_in_channels) * 4  # the velocities
        assert int(ranks[rank]["v2.w2.bytes"]) <= c.num_layers * 4 * c.hidden_size * tokens * 2


@pytest.mark.parametrize("world", [2, WORLD])
def test_whole_distilled_run_matches_one_process(ranks, world):
    with one_thread():
        reference = distilled_run(build("v2"))
    for rank in range(world):
        for ours, ref in zip(ranks[rank][f"distill.w{world}"], reference, strict=True):
            # 8 steps of one-forward differences (measured <= 5e-7 here: the tiny rows rarely flip a bf16)
            torch.testing.assert_close(ours, ref, rtol=0, atol=3e-2)


def test_cfg_parallel_matches_sequential_guidance(ranks):
    """Rank i runs branch i alone, exactly the call sequential guidance makes, so the whole 4-step guided
    run agrees to the last bits. (Guidance x5 turns one-ulp bf16 flips into ~0.2 on these latents within 4
    steps, so batched guidance is no reference: it sums its GEMMs over other row counts.)"""
    with one_thread():
        reference = guided_run(build("v2"), batch_cfg=False)
    for rank in range(2):
        for ours, ref in zip(ranks[rank]["cfg.w2"], reference, strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
