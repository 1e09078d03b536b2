"""The ``bench`` subcommand of ``cli.py``: its arguments and one runner per target, each a thin call into
the benchmark modules beside this one (imported when run, so ``--help`` stays fast)."""

import sys
from pathlib import Path

CLI = Path(__file__).resolve().parents[1] / "cli.py"  # re-run as child processes (converter, torchrun)


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speed and memory",
        description="Benchmarks (not tests). fp8: FP8 linear vs bf16 linear at the DiT's GEMM shapes (time, "
        "TFLOP/s, speed-up), then the converter's peak RSS on a large synthetic checkpoint. dit: one DiT "
        "forward (FP8 vs bf16 block linears; step time, weights and peak memory) at the token counts of "
        "5-second clips at 256p, 540p and 1080p; the full 15.3B model with random weights on a GPU, a "
        "reduced-width stand-in on CPU. vae: Turbo VAE and Wan2.2 VAE decode time and peak memory (real "
        "architectures, random weights) at those sizes. load: DiT load time against a raw read of the same "
        "bytes, and the loader's peak host memory, on a synthetic FP8 checkpoint in the published layout "
        "(real layer widths; all 40 layers on a GPU, 4 on CPU). gpu-check: the one GPU verification of "
        "GPU_REVIEW.md §4 (about 6 minutes on an H100/H200, random weights at real shapes): PASS/FAIL lines "
        "and gpu_check.json in --out; --dry-run runs every section at tiny shapes on the CPU. memory: "
        "device-free predictions of the full models' device peaks (DiT load, forward per clip size, FP8 and "
        "bf16, block swap) with fake tensors. long: a long clip made window by window (demo DiT at 448x256, "
        "Turbo VAE decode) at several lengths, each in a fresh process: time and peak memory against length.",
    )
    parser.add_argument("target", choices=sorted(BENCH_TARGETS), help="what to measure")
    parser.add_argument(
        "--device", default="auto", help="cuda, cpu or auto (cuda when available). Default: auto"
    )
    parser.add_argument(
        "--tokens",
        default=None,
        metavar="M,M,...",
        help="fp8: token counts M (GEMM rows). Default: 3700,14500,65000 on GPU, 256 on CPU",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per case (median). Default: fp8 10 GPU / 2 CPU; dit 5 GPU / 1 CPU",
    )
    parser.add_argument(
        "--clips",
        default="256p,540p,1080p",
        metavar="NAME,...",
        help="dit, vae: which clip sizes to run (256p, 540p, 1080p). Default: all three",
    )
    parser.add_argument(
        "--world",
        type=int,
        default=None,
        metavar="N",
        help="dit: sequence parallelism over N processes (1, 2, 4, 8; started with torchrun on 127.0.0.1, "
        "one GPU each on CUDA): step time and bytes sent per rank per step. Default: one process, FP8 vs "
        "bf16",
    )
    parser.add_argument(
        "--latent-frames",
        type=int,
        default=None,
        metavar="N",
        help="vae: latent frames per clip (default: 32 = 5 s on GPU, 2 on CPU)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        metavar="N",
        help="load: DiT layers in the synthetic checkpoint (default: 40 on GPU, 4 on CPU; ~0.27 GB each, "
        "~0.77 GB for the first and last)",
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="load: the full 40-layer DiT in 7 shards like the published folder (~15.3 GB in a temporary "
        "folder; on CPU the load needs ~15 GiB of RAM)",
    )
    parser.add_argument(
        "--convert-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="fp8: synthetic checkpoint for the memory test: one MagiHuman sandwich layer (3 experts; "
        "largest tensor 81912x5120) with its row counts times F. Default: 1.0; 0 skips the memory test",
    )
    parser.add_argument(
        "--convert-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp8: synthetic checkpoint dtype (default fp32)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("output/gpu-check"),
        help="gpu-check: folder for gpu_check.json (default output/gpu-check)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="gpu-check: every section at tiny shapes (on the CPU unless --device says otherwise)",
    )
    parser.add_argument(
        "--sections",
        default=None,
        metavar="N,N,...",
        help="gpu-check: only these sections (0-8). Default: all",
    )
    parser.add_argument(
        "--lengths", default="4,20", metavar="S,S,...", help="long: clip lengths in seconds (default 4,20)"
    )
    parser.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from ..pipeline.preflight import resolve_device

    return BENCH_TARGETS[args.target](args, resolve_device(args.device))


def _bench_fp8(args, device) -> int:
    import tempfile

    import torch

    from .convert_memory import bench_convert_memory
    from .fp8_linear import bench_fp8_linear, format_linear_results

    on_gpu = device.type == "cuda"
    tokens = [int(t) for t in (args.tokens or ("3700,14500,65000" if on_gpu else "256")).split(",")]
    repeats = args.repeats or (10 if on_gpu else 2)
    print(format_linear_results(bench_fp8_linear(device, tokens, repeats), device))
    if args.convert_scale > 0:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.convert_dtype]
        with tempfile.TemporaryDirectory(prefix="magihuman-bench-") as workdir:
            print(bench_convert_memory(Path(workdir), args.convert_scale, dtype, CLI))
    return 0


def _bench_dit(args, device) -> int:
    from .dit_forward import bench_dit_forward, format_forward_results

    repeats = args.repeats or (5 if device.type == "cuda" else 1)
    clips = args.clips.split(",")
    if args.world is not None:
        return _bench_dit_parallel(args, device, clips, repeats)
    print(format_forward_results(bench_dit_forward(device, clips, repeats), device))
    return 0


def _bench_dit_parallel(args, device, clips: list[str], repeats: int) -> int:
    """``--world N``: this process starts N ranks of itself with torchrun; each rank lands here again."""
    import os
    import subprocess

    import torch

    from ..pipeline.dit.parallel import free_port, start_group
    from .dit_parallel import bench_dit_parallel, format_parallel_results

    if args.world > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc-per-node", str(args.world), "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), str(CLI), "bench", "dit",
                   "--world", str(args.world), "--device", device.type, "--clips", ",".join(clips),
                   "--repeats", str(repeats)]  # fmt: skip
        # On the CPU the ranks share the cores: one rank per core is the fair split.
        threads = str(max(1, (os.cpu_count() or 1) // args.world))
        env = os.environ if device.type == "cuda" else {**os.environ, "OMP_NUM_THREADS": threads}
        return subprocess.run(command, env=env).returncode
    if device.type == "cuda" and args.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    plan = start_group(device)
    results = bench_dit_parallel(device, clips, repeats)
    if plan is None or plan.rank == 0:
        print(format_parallel_results(results, device))
    if plan is not None:
        torch.distributed.destroy_process_group()
    return 0


def _bench_vae(args, device) -> int:
    from .vae_decode import bench_vae_decode, format_decode_results

    sizes = args.clips.split(",")
    print(format_decode_results(bench_vae_decode(device, sizes, args.latent_frames), device))
    return 0


def _bench_load(args, device) -> int:
    import tempfile

    from .dit_load import bench_dit_load

    with tempfile.TemporaryDirectory(prefix="magihuman-bench-") as workdir:
        print(bench_dit_load(Path(workdir), device, args.layers, args.full_size))
    return 0


def _bench_gpu_check(args, device) -> int:
    import torch

    from .check_report import ERROR
    from .gpu_check import run_gpu_check

    if args.dry_run and args.device == "auto":
        device = torch.device("cpu")
    sections = [int(n) for n in args.sections.split(",")] if args.sections else None
    report = run_gpu_check(device, args.out, args.dry_run, sections)
    return 1 if any(c.status == ERROR for c in report.checks()) else 0


def _bench_memory(args, device) -> int:
    from .memory_model import bench_memory

    print(bench_memory())
    return 0


def _bench_long(args, device) -> int:
    from ..pipeline.sampling.windows import DEFAULT_WINDOWS
    from .long_clip import bench_long_clip, format_long_clip_results

    lengths = [float(s) for s in args.lengths.split(",")]
    results = bench_long_clip(device, lengths, 8, DEFAULT_WINDOWS)
    print(format_long_clip_results(results, device, DEFAULT_WINDOWS))
    return 0


BENCH_TARGETS = {
    "fp8": _bench_fp8,
    "dit": _bench_dit,
    "vae": _bench_vae,
    "load": _bench_load,
    "gpu-check": _bench_gpu_check,
    "memory": _bench_memory,
    "long": _bench_long,
}
