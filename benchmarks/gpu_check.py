"""``python cli.py bench gpu-check``: one command that checks what GPU_REVIEW.md §4 plans, on random weights
at the real shapes (no model files), in about 6 minutes on an H100/H200.

Sections run in order, each isolated: an exception (an OOM included) becomes an ERROR check for that section
and the next one starts. Every section prints its tables and ``CHECK <id> PASS|FAIL|INFO|ERROR`` lines as it
goes, and ``gpu_check.json`` in the output folder is rewritten after each one, so a crash or a timeout keeps
everything measured so far. PASS/FAIL judge the targets; FAIL on a speed or memory line is a finding, not a
crash. ``--dry-run`` runs every section at tiny shapes on the CPU (tests keep it working; its numbers mean
nothing and its speed and memory lines are INFO).
"""

import datetime
import time
import traceback
from pathlib import Path

import torch

from . import gpu_check_kernels as kernels
from . import gpu_check_model as model
from .check_report import ERROR, FAIL, Report, Scale, free
from .device import describe_device

SECTIONS = {
    0: ("environment", kernels.environment),
    1: ("_scaled_mm contract probes", kernels.scaled_mm_contract),
    2: ("per-GEMM FP8 against bf16", kernels.gemm_benchmark),
    3: ("one layer by kernel kind", model.layer_profile),
    4: ("SDPA backends and the no-flash fallback", kernels.attention_backends),
    5: ("full DiT forward", model.full_dit),
    6: ("memory-capped subprocesses", model.memory_caps),
    7: ("Turbo VAE at 1080p", model.turbo_vae),
    8: ("dequantize path (A100 / RTX 30xx stand-in)", kernels.dequantize_path),
}


def run_gpu_check(device: torch.device, out: Path, dry_run: bool = False, sections=None) -> Report:
    """Run ``sections`` (numbers; default all) and return the report, also written to out/gpu_check.json."""
    scale = Scale.dry() if dry_run else Scale.real()
    meta = {
        "command": "python cli.py bench gpu-check" + (" --dry-run" if dry_run else ""),
        "device": describe_device(device),
        "dry_run": dry_run,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report = Report(out / "gpu_check.json", meta, dry_run)
    report.write()
    for number in sections if sections is not None else SECTIONS:
        title, section = SECTIONS[number]
        report.begin(number, title)
        start = time.perf_counter()
        try:
            section(scale, device, report)
        except Exception as e:  # noqa: BLE001 (one section's failure must not stop the others)
            report.check(
                f"section{number}.completed", ERROR, type(e).__name__, note=str(e).splitlines()[0][:300]
            )
            report.sections[-1]["traceback"] = traceback.format_exc()[-4000:]
        finally:
            free(device)
        report.end(time.perf_counter() - start)
    print("\n== summary")
    for check in report.checks():
        print(check.line())
    failed = [c.id for c in report.checks() if c.status in (FAIL, ERROR)]
    print(f"\n{len(report.checks())} checks, {len(failed)} FAIL/ERROR; JSON: {report.path}", flush=True)
    return report
