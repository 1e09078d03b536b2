"""Peak resident memory of ``cli.py convert`` on a large synthetic checkpoint (one MagiHuman sandwich
layer)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# One sandwich layer (3 per-modality experts) of the real DiT, split into shards like the published folders.
SANDWICH_LAYER = {
    "model-00001-of-00003.safetensors": {
        "block.layers.36.attention.pre_norm.weight": (15360,),
        "block.layers.36.attention.linear_qkv.weight": (21624, 5120),
        "block.layers.36.attention.q_norm.weight": (384,),
        "block.layers.36.attention.k_norm.weight": (384,),
        "block.layers.36.attention.linear_proj.weight": (15360, 5120),
    },
    "model-00002-of-00003.safetensors": {
        "block.layers.36.mlp.up_gate_proj.weight": (81912, 5120),  # the model's largest tensor
    },
    "model-00003-of-00003.safetensors": {
        "block.layers.36.mlp.pre_norm.weight": (15360,),
        "block.layers.36.mlp.down_proj.weight": (15360, 13652),
    },
}


# Runs cli.py in the child and prints the child's own peak RSS (VmHWM, Linux). getrusage would not do: the
# kernel folds the parent's peak into a vforked child's maxrss at exec. VmHWM includes resident file pages.
PEAK_RSS_WRAPPER = """
import atexit, runpy, sys

def report():
    status = open("/proc/self/status").read()
    print("VmHWM" + status.split("VmHWM:")[1].split("kB")[0], file=sys.stderr)

atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_synthetic_checkpoint(folder: Path, scale: float, dtype: torch.dtype) -> int:
    """Random weights (std 0.02) with the matrices' row counts times ``scale``; returns the largest tensor's
    size in bytes. Writes an index like the published folders."""
    generator = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    folder.mkdir(parents=True)
    for shard, shapes in SANDWICH_LAYER.items():
        tensors = {}
        for key, shape in shapes.items():
            if len(shape) == 2:  # rows stay a multiple of 3 experts x 16
                shape = (max(48, round(shape[0] * scale / 48) * 48), shape[1])
            tensors[key] = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(dtype)
            largest = max(largest, tensors[key].nbytes)
            weight_map[key] = shard
        save_file(tensors, folder / shard)
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return largest


def _run_convert(cli: Path, source: Path, output: Path) -> tuple[int, float, str]:
    """(peak RSS in bytes, wall seconds, stdout) of ``cli.py convert`` in a child process."""
    command = [sys.executable, "-c", PEAK_RSS_WRAPPER, str(cli), "convert"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--input", str(source), "--output", str(output)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"convert failed:\n{done.stderr}")
    return int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) * 1024, seconds, done.stdout


def bench_convert_memory(workdir: Path, scale: float, dtype: torch.dtype, cli: Path) -> str:
    """Run the converter in a child process and report its peak RSS, above the peak of converting a tiny
    file (Python, torch and the pack), against 3 x the largest tensor + one output shard."""
    save_file({"w": torch.zeros(64, 64)}, workdir / "tiny.safetensors")
    baseline, _, _ = _run_convert(cli, workdir / "tiny.safetensors", workdir / "tiny")
    source, output = workdir / "source", workdir / "fp8"
    largest = write_synthetic_checkpoint(source, scale, dtype)
    peak, seconds, stdout = _run_convert(cli, source, output)
    shard = max(p.stat().st_size for p in output.glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    bound, used = 3 * largest + shard, peak - baseline
    summary = [line for line in stdout.splitlines() if not line.startswith(("block.", "wrote "))]
    return "\n".join(
        [
            "",
            f"converter peak RSS on a synthetic sandwich layer ({source_bytes / 1e9:.2f} GB of {dtype}, "
            f"row scale {scale}):",
            *(f"  {line}" for line in summary),
            f"  converter wall time {seconds:.1f} s (process start included)",
            f"  largest tensor {largest / 1e9:.3f} GB, largest output shard {shard / 1e9:.3f} GB",
            f"  peak RSS {peak / 1e9:.3f} GB = {baseline / 1e9:.3f} GB for a tiny file + {used / 1e9:.3f} GB;"
            f" bound 3 x largest + one output shard = {bound / 1e9:.3f} GB "
            f"({'within' if used <= bound else 'OVER'} bound)",
        ]
    )
