"""DiT load time against the raw read time of the same bytes, and the loader's peak host memory, on a
synthetic FP8 checkpoint in the published layout (``__fp8_scale`` keys, one shard per layer group, an index).

Real layer widths with random values; on CPU a few layers (two sandwich layers with three experts, the rest
plain), on a GPU the full 40. The load runs in a child process so its peak RSS (VmHWM, which counts resident
pages of the memory-mapped shards too) is its own.
"""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..fp8.writer import SafetensorsWriter
from ..pipeline.dit.config import PRESETS, DiTConfig
from ..pipeline.dit.loading import BLOCK_LINEAR

SHARD_BYTES = 10**9  # shard boundaries fall between layers, like the published folders
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

def peak_rss():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split("kB")[0]) * 1024

buffer = bytearray(64 * 2**20)
start = time.perf_counter()
for shard in sorted(folder.glob("*.safetensors")):
    with shard.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
raw = time.perf_counter() - start
baseline = peak_rss()
model, report = load_dit(folder, "distill", device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
resident = sum(t.nbytes for t in model.state_dict().values() if t.device.type == "cpu")
print(json.dumps({"raw": raw, "load": report.seconds, "bytes": report.bytes_read, "baseline": baseline,
                  "peak": peak_rss(), "host_model": resident, "linear": report.linear}))
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


def write_fp8_checkpoint(folder: Path, config: DiTConfig, random_values: bool = True) -> int:
    """Write the published FP8 layout (block linears float8_e4m3fn with a scalar ``__fp8_scale``, everything
    else bf16); returns the largest shard's size in bytes. ``random_values=False`` writes constants instead
    (15 GB in seconds, for memory checks that do not look at the values)."""
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
        if current and match and size >= SHARD_BYTES and key.endswith("attention.pre_norm.weight"):
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
                if dtype == torch.float8_e4m3fn and not random_values:
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


def bench_dit_load(workdir: Path, device: torch.device, layers: int | None) -> str:
    layers = layers or (40 if device.type == "cuda" else 4)
    folder = workdir / "distill_fp8"
    start = time.perf_counter()
    largest = write_fp8_checkpoint(folder, synthetic_config(layers))
    written = time.perf_counter() - start
    root = str(Path(__file__).resolve().parent.parent)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(folder), str(device)], capture_output=True, text=True
    )
    if child.returncode:
        raise RuntimeError(f"the load child failed:\n{child.stderr}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    above = r["peak"] - r["baseline"]
    bound = 1.1 * largest + r["host_model"]
    gb = 1e9
    return "\n".join(
        [
            f"DiT load on {device}: synthetic FP8 checkpoint, {layers} real-width layers, "
            f"{r['bytes'] / gb:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards "
            f"(written in {written:.0f} s), {r['linear']}",
            f"  raw read of the shards   {r['raw']:6.2f} s  ({r['bytes'] / gb / r['raw']:.2f} GB/s, "
            "page cache warm)",
            f"  load_dit                 {r['load']:6.2f} s  ({r['bytes'] / gb / r['load']:.2f} GB/s, "
            f"{r['load'] / r['raw']:.2f}x the raw read)",
            f"  peak RSS {r['peak'] / gb:.2f} GB = {r['baseline'] / gb:.2f} GB before loading "
            f"+ {above / gb:.2f} GB;"
            f" model on the host {r['host_model'] / gb:.2f} GB, largest shard {largest / gb:.2f} GB",
            f"  bound: model on the host + 1.1 x largest shard = {bound / gb:.2f} GB "
            f"({'within' if above <= bound else 'OVER'} bound)",
        ]
    )
