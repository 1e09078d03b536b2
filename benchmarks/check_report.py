"""What ``bench gpu-check`` sections share: the sizes they run at (real on a GPU, tiny for ``--dry-run``),
the report they write into (tables, CHECK lines, a JSON file rewritten after every section), and the
timing and peak-memory helpers (CUDA events and allocator peaks on a GPU; wall clock and nothing on CPU)."""

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..pipeline.codecs.turbo_vae import TurboConfig
from ..pipeline.dit.config import PRESETS, DiTConfig
from ..pipeline.dit.tokens import SampleShape

PASS, FAIL, INFO, ERROR, SKIP = "PASS", "FAIL", "INFO", "ERROR", "SKIP"


def _small(config: DiTConfig, local: tuple[int, ...]) -> DiTConfig:
    """Three layers of the tiny test architecture: a quick-GELU sandwich layer, a shared SwiGLU layer and a
    SwiGLU sandwich layer."""
    return dataclasses.replace(
        config, num_layers=3, mm_layers=(0, 2), gelu7_layers=(0,), local_attn_layers=local
    )


@dataclass(frozen=True)
class Scale:
    """Every size a section runs at. ``real()``: the 15.3B model's shapes and 5 s clips; ``dry()``: tiny
    stand-ins with the same awkward properties (N and K not multiples of 16, GQA, experts, local layers)."""

    dry_run: bool
    repeats: int
    gemm_tokens: tuple[int, ...]  # M of the per-GEMM benchmark
    gemm_shapes: tuple[tuple[int, int, str], ...]  # (N, K, name) of one expert
    probe_tokens: tuple[int, ...]  # _scaled_mm contract probes
    probe_n: tuple[int, ...]  # already multiples of 16 (the padded widths)
    probe_k: tuple[int, ...]
    expert_splits: tuple[tuple[int, int, int], ...]
    heads: tuple[int, int, int]  # query heads, KV heads, head dim
    attention_tokens: tuple[int, ...]  # the simulated-Windows run
    base: DiTConfig  # the 256p model
    sr: DiTConfig  # the 1080p SR model (local attention)
    shared_layer: int
    mm_layer: int
    clip_256p: SampleShape
    clip_1080p: SampleShape
    caps_gib: tuple[float, float]  # the two capped subprocesses
    swap_layers: int
    turbo: TurboConfig
    turbo_window: tuple[int, int, int, int, int]  # a 1080p Turbo VAE latent window [1, 48, T, h, w]
    vae_clip: tuple[int, int, int, int, int]  # a whole 256p clip's latent
    upsample_input: tuple[int, int, int, int]  # the nearest-upsample check's [frames, C, H, W]

    @classmethod
    def real(cls) -> "Scale":
        return cls(
            dry_run=False,
            repeats=5,
            gemm_tokens=(4010, 14760, 65700),
            gemm_shapes=((7208, 5120, "linear_qkv"), (5120, 5120, "linear_proj"),
                         (27304, 5120, "up_gate_proj"), (5120, 13652, "down_proj")),
            probe_tokens=(1, 7, 126, 300, 4010),
            probe_n=(7216, 27312, 5120),
            probe_k=(5120, 13664, 20480),
            expert_splits=((3584, 126, 300), (0, 126, 300)),
            heads=(40, 8, 128),
            attention_tokens=(4010, 8000),
            base=PRESETS["distill"],
            sr=PRESETS["sr_1080p"],
            shared_layer=10,
            mm_layer=38,
            clip_256p=SampleShape(32, 8, 14, 126, 300),  # 4,010 tokens
            clip_1080p=SampleShape(32, 34, 60, 126, 300),  # 65,706 tokens
            caps_gib=(24.0, 16.0),
            swap_layers=15,
            turbo=TurboConfig(),
            turbo_window=(1, 48, 9, 68, 120),
            vae_clip=(1, 48, 32, 16, 28),
            upsample_input=(36, 128, 272, 480),
        )  # fmt: skip

    @classmethod
    def dry(cls) -> "Scale":
        return cls(
            dry_run=True,
            repeats=1,
            gemm_tokens=(33,),
            gemm_shapes=((120, 64, "linear_qkv"), (64, 64, "linear_proj"), (344, 64, "up_gate_proj"),
                         (64, 172, "down_proj")),
            probe_tokens=(1, 7),
            probe_n=(48,),
            probe_k=(64, 96),
            expert_splits=((20, 3, 5), (0, 3, 5)),
            heads=(8, 2, 16),
            attention_tokens=(40,),
            base=_small(PRESETS["tiny"].with_variant("distill"), ()),
            sr=_small(PRESETS["tiny_sr_1080p"], (0, 2)),
            shared_layer=1,
            mm_layer=2,
            clip_256p=SampleShape(3, 2, 3, 5, 4),
            clip_1080p=SampleShape(5, 2, 2, 5, 4),
            caps_gib=(0.0, 0.0),  # no cap on CPU
            swap_layers=1,
            turbo=TurboConfig(block_out_channels=(4, 8, 12, 16)),
            turbo_window=(1, 48, 2, 2, 2),
            vae_clip=(1, 48, 2, 2, 2),
            upsample_input=(2, 4, 6, 8),
        )  # fmt: skip


@dataclass
class Check:
    id: str
    status: str
    value: object = None
    threshold: str = ""
    note: str = ""

    def line(self) -> str:
        value = f" value={_short(self.value)}" if self.value is not None else ""
        threshold = f" threshold={self.threshold}" if self.threshold else ""
        note = f"  # {self.note}" if self.note else ""
        return f"CHECK {self.id} {self.status}{value}{threshold}{note}"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def judged(ok: bool) -> str:
    return PASS if ok else FAIL


@dataclass
class Report:
    """Tables and checks of every section, printed as they come and saved to ``path`` after each section
    (so a crash or a timeout keeps everything measured so far)."""

    path: Path
    meta: dict
    dry_run: bool = False
    sections: list[dict] = field(default_factory=list)

    def begin(self, number: int, title: str) -> None:
        self.sections.append({"number": number, "title": title, "tables": [], "checks": [], "seconds": None})
        print(f"\n== {number}. {title}", flush=True)
        self.write()  # a section that hangs or kills the process still shows as started

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        self.sections[-1]["tables"].append({"title": title, "header": header, "rows": rows})
        widths = [max(len(str(h)), *(len(_short(r[i])) for r in rows)) for i, h in enumerate(header)]
        print(f"-- {title}")
        print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            print("  ".join(_short(c).rjust(w) for c, w in zip(row, widths, strict=True)))
        print(flush=True)

    def check(self, id: str, status: str, value=None, threshold: str = "", note: str = "") -> Check:
        check = Check(id, status, _jsonable(value), threshold, note)
        self.sections[-1]["checks"].append(asdict(check))
        print(check.line(), flush=True)
        return check

    def verify(self, id: str, ok: bool, value=None, threshold: str = "", note: str = "") -> Check:
        """A correctness check (results agree, nothing crashes): judged in a dry run too."""
        return self.check(id, judged(ok), value, threshold, note)

    def measure(self, id: str, ok: bool, value=None, threshold: str = "", note: str = "") -> Check:
        """A speed or memory target: judged on a GPU run; INFO in a dry run, whose numbers mean nothing."""
        return self.check(id, INFO if self.dry_run else judged(ok), value, threshold, note)

    def end(self, seconds: float) -> None:
        self.sections[-1]["seconds"] = round(seconds, 2)
        self.write()

    def checks(self) -> list[Check]:
        return [Check(**c) for s in self.sections for c in s["checks"]]

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.part")
        partial.write_text(json.dumps({**self.meta, "sections": self.sections}, indent=1, default=str))
        partial.replace(self.path)  # atomic: a reader never sees half a file


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


# ---- measuring -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Median milliseconds of ``fn()`` (after one warm-up call unless ``warm_up=False``, for callers that
    just ran it): CUDA events on a GPU, wall clock elsewhere."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def transient_bytes(fn, device: torch.device):
    """(result, bytes allocated above what was allocated before the call, at its peak) on a GPU; (result,
    None) elsewhere."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def no_host_sync(fn, device: torch.device) -> bool | None:
    """Whether ``fn()`` runs without a host sync (CUDA sync debug mode "error"); None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / 2**30


def free(device: torch.device) -> None:
    """Return cached blocks between measurements, so that one section's leftovers do not count in the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
