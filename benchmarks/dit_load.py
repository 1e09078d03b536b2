"""DiT load time against the raw read time of the same bytes, and the loader's peak host memory, on a
synthetic FP8 checkpoint in the published layout (``__fp8_scale`` keys, one shard per layer group, an index).

Real layer widths with random values; on CPU a few layers (two sandwich layers with three experts, the rest
plain), on a GPU the full 40; ``full_size`` writes all 40 layers in 7 shards like the published folder
(~15.3 GB). The load runs in a child process so its peak RSS (VmHWM, which counts resident pages of the
memory-mapped shards too) is its own; on a GPU it also reports the peak allocated GPU memory of the load.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..fp8.writer import SafetensorsWriter
from ..pipeline.dit.config import PRESETS, DiTConfig
from ..pipeline.dit.loading import BLOCK_LINEAR
from .device import describe_device

SHARD_BYTES = 10**9  # shard boundaries fall between layers, like the published folders
FULL_SIZE_SHARD_BYTES = 2 * 10**9  # about the published folder's 7 shards
LAYER = re.compile(r"block\.layers\.(\d+)\.")

# Child: time a raw read of every shard, then load_dit, and print both with the peak RSS as JSON. Both reads
# find the files in the page cache (the parent has just written them): this compares the loader's own work
# with plain I/O, not disk speed.
CHILD = """
import json, sys, time
from pathlib import Path
root, folder, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, root)
import _bootstrap
_bootstrap.load()
import torch
from magihuman.pipeline.dit.loading import load_dit

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split("kB")[0]) * 1024

buffer = bytearray(64 * 2**20)
start = time.perf_counter()
for shard in sorted(folder.glob("*.safetensors")):
    with shard.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
raw = time.perf_counter() - start
baseline, gpu_before = status("VmHWM"), 0
if device.startswith("cuda"):
    torch.cuda.init()
    gpu_before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
model, report = load_dit(folder, "distill", device=device)
gpu_peak = gpu_model = 0
if device.startswith("cuda"):
    torch.cuda.synchronize()
    gpu_peak = torch.cuda.max_memory_allocated() - gpu_before
    gpu_model = torch.cuda.memory_allocated() - gpu_before
storages = {t.untyped_storage()._cdata: t for t in [*model.parameters(), *model.buffers()]}.values()
resident = sum(t.untyped_storage().nbytes() for t in storages if t.device.type == "cpu")
largest = max(t.untyped_storage().nbytes() for t in storages)
print(json.dumps({"raw": raw, "load": report.seconds, "bytes": report.bytes_read, "baseline": baseline,
                  "peak": status("VmHWM"), "rss": status("VmRSS"), "host_model": resident, "largest": largest,
                  "gpu_peak": gpu_peak, "gpu_model": gpu_model, "linear": report.linear}))
"""


# Child: the time of the first touch of 1 GiB of fresh memory (page faults, zeroing), which every load into
# memory the model owns pays on top of a raw read into one reused buffer: on a VM it can exceed the read.
FIRST_TOUCH = """
import time, torch
start = time.perf_counter()
torch.empty(2**30, dtype=torch.uint8).fill_(1)
print(time.perf_counter() - start)
"""


def synthetic_config(layers: int) -> DiTConfig:
    """The distilled DiT's widths with ``layers`` layers: per-modality experts on the first and last layer,
    quick-GELU on the first, SwiGLU elsewhere."""
    if layers == PRESETS["distill"].num_layers:
        return PRESETS["distill"]
    return dataclasses.replace(
        PRESETS["distill"], num_layers=layers, mm_layers=(0, layers - 1), gelu7_layers=(0,)
    )


def _random_fp8(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # Bytes 0x00..0x7E are the finite non-negative e4m3fn values (0x7F is NaN): a valid weight, made fast.
    return torch.randint(0, 0x7F, shape, generator=generator, dtype=torch.uint8).view(torch.float8_e4m3fn)


def write_fp8_checkpoint(
    folder: Path,
    config: DiTConfig,
    random_values: bool = True,
    shard_bytes: int = SHARD_BYTES,
    sparse: bool = False,
) -> int:
    """Write the published FP8 layout (block linears float8_e4m3fn with a scalar ``__fp8_scale``, everything
    else bf16); returns the largest shard's size in bytes. ``random_values=False`` writes constants instead
    (15 GB in seconds, for memory checks that do not look at the values). ``sparse``: only the scales are
    written, the weights are holes (zeros, no disk space), for loads that never read them (memory model)."""
    layout = {}
    for key, shape in config.expected_shapes().items():
        if BLOCK_LINEAR.fullmatch(key):
            layout[key] = (torch.float8_e4m3fn, shape)
            layout[f"{key}.__fp8_scale"] = (torch.float32, ())
        else:
            layout[key] = (torch.bfloat16, shape)
    shards, current, size = [], {}, 0
    for key, (dtype, shape) in layout.items():
        match = LAYER.match(key)
        if current and match and size >= shard_bytes and key.endswith("attention.pre_norm.weight"):
            shards.append(current)
            current, size = {}, 0
        current[key] = (dtype, shape)
        size += dtype.itemsize * torch.Size(shape).numel()
    shards.append(current)

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / name, shard, {"format": "pt"}) as writer:
            for key in writer.order:
                dtype, shape = shard[key]
                if sparse and not key.endswith("__fp8_scale"):
                    writer.skip(key)
                elif dtype == torch.float8_e4m3fn and not random_values:
                    writer.write(key, torch.full(shape, 0x30, dtype=torch.uint8).view(dtype))  # 0.5
                elif dtype == torch.float8_e4m3fn:
                    writer.write(key, _random_fp8(shape, generator))
                elif key.endswith("__fp8_scale"):
                    writer.write(key, torch.tensor(0.002))
                else:
                    writer.write(key, torch.randn(shape, generator=generator).mul_(0.02).to(dtype))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"quantization": "fp8_e4m3fn_per_tensor"}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def bench_dit_load(workdir: Path, device: torch.device, layers: int | None, full_size: bool = False) -> str:
    layers = 40 if full_size else layers or (40 if device.type == "cuda" else 4)
    folder = workdir / "distill_fp8"
    start = time.perf_counter()
    shard_bytes = FULL_SIZE_SHARD_BYTES if full_size else SHARD_BYTES
    largest_shard = write_fp8_checkpoint(folder, synthetic_config(layers), shard_bytes=shard_bytes)
    written = time.perf_counter() - start
    if hasattr(os, "sync"):  # not on Windows
        os.sync()  # let writeback finish first: the timed reads should not compete with it
    root = str(Path(__file__).resolve().parent.parent)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(folder), str(device)], capture_output=True, text=True
    )
    if child.returncode:
        raise RuntimeError(f"the load child failed:\n{child.stderr}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    touch = float(subprocess.run([sys.executable, "-c", FIRST_TOUCH], capture_output=True, text=True).stdout)
    above = r["peak"] - r["baseline"]
    gb, gib = 1e9, 2**30
    lines = [
        f"DiT load on {describe_device(device)}: synthetic FP8 checkpoint, {layers} real-width layers, "
        f"{r['bytes'] / gb:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards "
        f"(written in {written:.0f} s), {r['linear']}",
        f"  raw read of the shards   {r['raw']:6.2f} s  ({r['bytes'] / gb / r['raw']:.2f} GB/s, "
        "page cache warm where it fits)",
        f"  load_dit                 {r['load']:6.2f} s  ({r['bytes'] / gb / r['load']:.2f} GB/s, "
        f"{r['load'] / r['raw']:.2f}x the raw read; target <= 1.2x: "
        f"{'met' if r['load'] <= 1.2 * r['raw'] else 'NOT met'})",
        f"  first touch of fresh memory {touch:.2f} s/GiB here: the {r['host_model'] / gib:.2f} GiB the "
        f"model owns on the host cost about {touch * r['host_model'] / gib:.2f} s of any load that owns them",
        f"  peak RSS {r['peak'] / gib:.2f} GiB = {r['baseline'] / gib:.2f} GiB before loading "
        f"+ {above / gib:.2f} GiB; RSS after the load {r['rss'] / gib:.2f} GiB; model on the host "
        f"{r['host_model'] / gib:.2f} GiB, largest shard {largest_shard / gib:.2f} GiB",
    ]
    if r["host_model"]:
        bound = r["host_model"] + gib
        verdict = "within" if r["rss"] - r["baseline"] <= bound else "OVER"
        lines.append(f"  target: RSS added by the load <= model on the host + 1 GiB = {bound / gib:.2f} GiB "
                     f"({verdict})")  # fmt: skip
    if device.type == "cuda":
        bound = r["gpu_model"] + r["largest"]
        verdict = "within" if r["gpu_peak"] <= bound else "OVER"
        lines.append(
            f"  GPU: peak allocated during the load {r['gpu_peak'] / gib:.2f} GiB, model "
            f"{r['gpu_model'] / gib:.2f} GiB; target <= model + largest tensor = {bound / gib:.2f} GiB "
            f"({verdict})"
        )
    return "\n".join(lines)
