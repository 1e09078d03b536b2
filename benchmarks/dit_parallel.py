"""DiT step time with sequence parallelism over W processes, and the bytes each rank sends per step.

Run under a process group (``python cli.py bench dit --world N`` starts the ranks with torchrun; world 1 runs
in this process). Every rank builds the same random DiT (same seed) and the same inputs; a step is one DiT
forward of one sample. On a GPU the full 15.3B model runs, on the CPU the reduced-width stand-in of
``dit_forward.py``.
"""

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..pipeline.dit.config import PRESETS
from ..pipeline.dit.parallel import ParallelDiT, Ulysses
from .device import describe_device
from .dit_forward import CLIPS, TEXT_TOKENS, clip_inputs, random_dit, reduced


@dataclass(frozen=True)
class ParallelResult:
    clip: str
    tokens: int
    world: int
    seconds: float  # median step time
    bytes_sent: int  # per step, the most any rank sent
    layers: int
    hidden: int


def bench_dit_parallel(device: torch.device, clips: list[str], repeats: int) -> list[ParallelResult]:
    on_gpu = device.type == "cuda"
    world = dist.get_world_size() if dist.is_initialized() else 1
    results = []
    for name, width, height, preset in (c for c in CLIPS if c[0] in clips):
        config = PRESETS[preset] if on_gpu else reduced(PRESETS[preset])
        model = random_dit(config, "fp8", device)
        ulysses = Ulysses.of() if world > 1 else None
        run = ParallelDiT(model, ulysses) if ulysses else model
        torch.manual_seed(0)  # the same inputs on every rank
        sample = clip_inputs(width, height, device, scale=1.0 if on_gpu else 0.125)
        times = []
        with torch.inference_mode():
            run(*sample)  # warm-up
            if ulysses:
                ulysses.bytes_sent = 0
            for _ in range(repeats):
                if on_gpu:
                    torch.cuda.synchronize(device)
                if ulysses:
                    dist.barrier()
                start = time.perf_counter()
                run(*sample)
                if on_gpu:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        sent = 0
        if ulysses:
            counts = torch.tensor([ulysses.bytes_sent // repeats])
            dist.all_reduce(counts, dist.ReduceOp.MAX)
            sent = int(counts)
        tokens = sample[0][0, 0].numel() // 4 + sample[1].shape[1] + TEXT_TOKENS
        results.append(
            ParallelResult(
                name, tokens, world, statistics.median(times), sent, config.num_layers, config.hidden_size
            )
        )
        del model, run, sample
    return results


def format_parallel_results(results: list[ParallelResult], device: torch.device) -> str:
    full = device.type == "cuda"
    lines = [
        f"DiT step with sequence parallelism on {describe_device(device)}",
        "full 15.3B model, FP8" if full else "reduced-width CPU stand-in (hidden 1024, 8 layers, 1/8 frames)",
        "sent = bytes the busiest rank sends per step; bound = 4 x hidden x tokens x 2 bytes per layer",
        "",
        f"{'clip':<7}{'tokens':>8}{'world':>7}{'step s':>9}{'sent MiB':>10}{'per layer MiB':>15}"
        f"{'bound MiB':>11}",
    ]
    for r in results:
        bound = 4 * r.hidden * r.tokens * 2 / 2**20
        lines.append(
            f"{r.clip:<7}{r.tokens:>8}{r.world:>7}{r.seconds:>9.3f}{r.bytes_sent / 2**20:>10.2f}"
            f"{r.bytes_sent / r.layers / 2**20:>15.2f}{bound:>11.2f}"
        )
    return "\n".join(lines)
