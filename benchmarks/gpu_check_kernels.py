"""``bench gpu-check`` sections 0, 1, 2, 4 and 8 (GPU_REVIEW.md §4): the environment, the ``_scaled_mm``
contract, per-GEMM FP8 against bf16, the SDPA backends (and the simulated Windows fallback), the dequantize
path. Each takes (scale, device, report) and records tables and checks; random weights at real shapes."""

import functools
import math
import platform
import re
import warnings

import torch
import torch.nn.functional as F

from ..fp8.capability import (
    DEQUANTIZE,
    FP8_MATMUL,
    choose_path,
    supports_fp8_matmul,
    supports_rowwise_scaled_mm,
)
from ..fp8.linear import Fp8Linear, scale_to_fp8
from ..fp8.quantize import FP8_MAX, MIN_AMAX, Granularity, quantize, sqnr_db
from ..pipeline.dit.attention import StreamAttention
from ..pipeline.dit.fusion import compile_available, fp8_casts_compile, should_fuse
from ..pipeline.dit.sdpa import SdpaAttention, sdpa_usable
from ..pipeline.dit.tokens import TokenStream
from .check_report import INFO, SKIP, Report, Scale, free, gib, median_ms, no_host_sync, transient_bytes
from .device import describe_device


def _randn(shape, generator, device, std=1.0) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).mul_(std)


def quantize_activation(x: torch.Tensor, padded_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 linear's dynamic per-tensor activation quantization, for GEMM-only timing: x [M, K] bf16 ->
    (x8 [M, K_padded] FP8, 0-dim float32 scale)."""
    scale = (torch.linalg.vector_norm(x, ord=math.inf).clamp(min=MIN_AMAX) / FP8_MAX).to(torch.float32)
    return scale_to_fp8(x, scale, padded_in), scale


def _raises(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return "raised: " + str(e).splitlines()[0][:120]
    return "accepted"


# ---- 0 -----------------------------------------------------------------------------------------------------
def environment(scale: Scale, device: torch.device, report: Report) -> None:
    cuda = device.type == "cuda"
    facts = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "flash attention built": getattr(torch.backends.cuda, "is_flash_attention_available", lambda: None)()
        if cuda
        else None,
        "fp8 path (auto)": choose_path("auto", device),
        "row-wise _scaled_mm": supports_rowwise_scaled_mm(device),
        "row-wise _scaled_mm, fast accum": supports_rowwise_scaled_mm(device, True),
        "torch.compile available": compile_available(device),
        "elementwise compiled (auto)": should_fuse("auto", device),
        "fp8 casts compiled": fp8_casts_compile(device),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    report.table("environment", ["fact", "value"], [[k, str(v)] for k, v in facts.items()])
    for key, value in facts.items():
        report.check("env." + re.sub(r"\W+", "_", key).strip("_"), INFO, str(value))


# ---- 1 -----------------------------------------------------------------------------------------------------
def _tensorwise_probe(device: torch.device, n: int, k: int, m: int) -> list[list]:
    generator = torch.Generator(device).manual_seed(n + k + m)
    fp8 = quantize(_randn((n, k), generator, device, 0.02))
    x8, x_scale = quantize_activation(_randn((m, k), generator, device), k)
    reference = (x8.float() * x_scale) @ fp8.dequantize(torch.float32).T  # both operands exactly dequantized
    rows = []
    for shape in ((), (1,), (1, 1)):
        scales = {"scale_a": x_scale.reshape(shape), "scale_b": fp8.scale.reshape(shape)}
        try:
            y = torch._scaled_mm(x8, fp8.data.t(), out_dtype=torch.bfloat16, **scales)
            db, note = sqnr_db(reference, y[0] if isinstance(y, tuple) else y), ""
        except RuntimeError as e:  # recorded (and judged below), so the other probes still run
            db, note = -math.inf, str(e).splitlines()[0][:80]
        rows.append([m, n, k, str(list(shape)), db, note])
    return rows


def _contract_errors(scale: Scale, device: torch.device, report: Report) -> None:
    """Calls the FP8 linear pads and transposes to avoid must raise: N % 16 != 0, and a row-major mat2."""
    generator = torch.Generator(device).manual_seed(11)
    k = scale.probe_k[0]
    odd = quantize(_randn((scale.probe_n[0] - 8, k), generator, device, 0.02))  # N % 16 == 8
    x8, x_scale = quantize_activation(_randn((scale.probe_tokens[-1], k), generator, device), k)
    options = {"scale_a": x_scale, "scale_b": odd.scale, "out_dtype": torch.bfloat16}
    outcomes = {
        "unpadded_n_raises": _raises(lambda: torch._scaled_mm(x8, odd.data.t(), **options)),
        "row_major_mat2_raises": _raises(lambda: torch._scaled_mm(x8, odd.data.t().contiguous(), **options)),
    }
    for name, outcome in outcomes.items():
        if device.type == "cuda":
            report.verify(f"scaled_mm.{name}", outcome.startswith("raised"), outcome)
        else:  # CPU's emulation need not enforce the cuBLASLt layout rules
            report.check(f"scaled_mm.{name}", INFO, outcome)


def _expert_layers(scale: Scale, device: torch.device, report: Report) -> None:
    """A 3-expert FP8 linear in every scale granularity (per row: C1's crash) against the dequantize path."""
    generator = torch.Generator(device).manual_seed(12)
    n, k = scale.probe_n[0], scale.probe_k[0]
    x = _randn((sum(scale.expert_splits[0]), k), generator, device)
    for granularity in Granularity:
        fp8 = quantize(_randn((3 * n, k), generator, device, 0.02), granularity, num_experts=3)
        layer = Fp8Linear.from_fp8(fp8, 3, mode=FP8_MATMUL)
        reference = Fp8Linear.from_fp8(fp8, 3, mode=DEQUANTIZE)
        how = {True: "row-wise kernel", False: "per-tensor GEMM, columns scaled after"}[layer.rowwise]
        for splits in scale.expert_splits:
            rows = x[: sum(splits)]
            try:
                db, note = sqnr_db(reference(rows, splits), layer(rows, splits)), ""
            except RuntimeError as e:  # C1: the crash this check exists for
                db, note = -math.inf, str(e).splitlines()[0][:120]
            note = note or (how if granularity is Granularity.ROW else "")
            where = f"scaled_mm.experts_{granularity.value}_{'_'.join(map(str, splits))}"
            report.verify(where, db > 30.0, db, "> 30 dB", note)


def scaled_mm_contract(scale: Scale, device: torch.device, report: Report) -> None:
    if not supports_fp8_matmul(device):
        report.check(
            "scaled_mm.available", SKIP, False, note="no _scaled_mm here: dequantize path (section 8)"
        )
        return
    rows = [
        row
        for n in scale.probe_n
        for k in scale.probe_k
        for m in scale.probe_tokens
        for row in _tensorwise_probe(device, n, k, m)
    ]
    report.table(
        "tensor-wise _scaled_mm against the dequantized product",
        ["M", "N", "K", "scales", "SQNR dB", "error"],
        rows,
    )
    worst = min(row[4] for row in rows)
    report.verify("scaled_mm.tensorwise_sqnr_db", worst > 30.0, worst, "> 30 (worst case)")
    _contract_errors(scale, device, report)
    for fast in (False, True):
        report.check(f"scaled_mm.rowwise_fast_accum_{fast}", INFO, supports_rowwise_scaled_mm(device, fast))
    _expert_layers(scale, device, report)


# ---- 2 -----------------------------------------------------------------------------------------------------
GEMM_HEADER = ["GEMM", "M", "bf16 ms", "bf16 TFLOP/s", "dequant ms", "dequant x"]
FP8_HEADER = [
    "gemm-only ms",
    "fp8 ms",
    "fp8 fast ms",
    "gemm-only x",
    "fp8 x",
    "fp8 fast x",
    "non-GEMM % of GEMM",
    "transient GiB",
    "fp8 SQNR dB",
    "fast SQNR dB",
]


def _gemm_case(scale: Scale, device: torch.device, report: Report, layers: dict, m: int) -> list:
    """One (GEMM, M) row: bf16 ``F.linear``, the dequantize path and, where the device has FP8 matmuls, the
    FP8 linear with fast accumulation off and on, its GEMM alone, its transient memory and host syncs."""
    bf16_weight, dequantize = layers["bf16"], layers["dequantize"]
    n, k, name = dequantize.out_features, dequantize.in_features, layers["name"]
    x = _randn((m, k), torch.Generator(device).manual_seed(m), device)
    ms = {"bf16": median_ms(lambda: F.linear(x, bf16_weight), device, scale.repeats)}
    ms["dequantize"] = median_ms(lambda: dequantize(x), device, scale.repeats)
    row = [
        name,
        m,
        ms["bf16"],
        2 * m * n * k / ms["bf16"] / 1e9,
        ms["dequantize"],
        ms["bf16"] / ms["dequantize"],
    ]
    if "fp8" not in layers:
        return row
    fp8, fast = layers["fp8"], layers["fp8 fast"]
    reference = F.linear(x.float(), layers["weight"].dequantize(torch.float32))  # weights in e4m3, exact
    x8, x_scale = quantize_activation(x, fp8.padded_in)
    ms["fp8"] = median_ms(lambda: fp8(x), device, scale.repeats)
    ms["fp8 fast"] = median_ms(lambda: fast(x), device, scale.repeats)
    ms["gemm"] = median_ms(lambda: fp8._gemm(x8, x_scale, 0), device, scale.repeats)
    overhead = max(ms["fp8"] - ms["gemm"], 0.0)  # quantization, slice and copy: all but the GEMM
    out, transient = transient_bytes(lambda: fp8(x), device)
    synced = no_host_sync(lambda: fp8(x), device)
    db, fast_db = sqnr_db(reference, out), sqnr_db(reference, fast(x))
    row += [
        ms["gemm"],
        ms["fp8"],
        ms["fp8 fast"],
        ms["bf16"] / ms["gemm"],
        ms["bf16"] / ms["fp8"],
        ms["bf16"] / ms["fp8 fast"],
        100 * overhead / ms["gemm"],
        gib(transient),
        db,
        fast_db,
    ]
    where = f"gemm.{name}_m{m}"
    if m >= 4000 or scale.dry_run:
        speedup, full = ms["bf16"] / ms["gemm"], ms["bf16"] / ms["fp8"]
        report.measure(f"{where}.gemm_only_speedup", speedup >= 1.6, speedup, ">= 1.6")
        report.measure(f"{where}.fp8_linear_speedup", full >= 1.3, full, ">= 1.3")
        report.measure(
            f"{where}.quant_share_of_gemm", overhead <= 0.3 * ms["gemm"], overhead / ms["gemm"], "<= 0.3"
        )
    if transient is not None:
        bound = m * n * 2 + 1.25 * m * k
        report.measure(f"{where}.transient_bytes", transient <= bound, transient, f"<= {bound:.4g}")
    if synced is not None:
        report.verify(f"{where}.no_host_sync", synced, synced)
    report.verify(f"{where}.fp8_sqnr_db", db > 25.0, db, "> 25", f"fast accumulation: {fast_db:.1f} dB")
    return row


def gemm_benchmark(scale: Scale, device: torch.device, report: Report) -> None:
    generator = torch.Generator(device).manual_seed(2)
    rows = []
    for n, k, name in scale.gemm_shapes:
        weight = _randn((n, k), generator, device, 0.02)
        fp8 = quantize(weight)
        layers = {
            "name": name,
            "bf16": weight,
            "weight": fp8,
            "dequantize": Fp8Linear.from_fp8(fp8, mode=DEQUANTIZE),
        }
        if supports_fp8_matmul(device):
            layers["fp8"] = Fp8Linear.from_fp8(fp8, mode=FP8_MATMUL)
            layers["fp8 fast"] = Fp8Linear.from_fp8(fp8, mode=FP8_MATMUL, fast_accum=True)
        rows += [_gemm_case(scale, device, report, layers, m) for m in scale.gemm_tokens]
        layers.clear()
        free(device)
    header = GEMM_HEADER + (FP8_HEADER if supports_fp8_matmul(device) else [])
    report.table("one expert's GEMM: bf16 against FP8 (x = speed-up over bf16)", header, rows)


# ---- 4 -----------------------------------------------------------------------------------------------------
def _attention_inputs(scale: Scale, tokens: int, device: torch.device, generator: torch.Generator):
    """q, k [S,H,D] contiguous (as apply_rope writes them) and v a row-strided view of a qkv output."""
    hq, hkv, dh = scale.heads
    qkv = _randn((tokens, (hq + 2 * hkv) * dh + hq), generator, device)  # [S, qkv width]
    q, k = _randn((tokens, hq, dh), generator, device), _randn((tokens, hkv, dh), generator, device)
    v = qkv[:, (hq + hkv) * dh : (hq + 2 * hkv) * dh].view(tokens, hkv, dh)
    return q, k, v


def _backend_reasons(q, k, v) -> dict[str, str]:
    """Each fused kernel's verdict on the GQA call, with torch's own reason when it refuses (CUDA only)."""
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    verdicts = {}
    for backend in ("flash", "efficient", "cudnn"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if q.device.type == "cuda" and hasattr(torch.backends.cuda, f"can_use_{backend}_attention"):
                params = torch.backends.cuda.SDPAParams(q4, k4, v4, None, 0.0, False, True)
                ok = getattr(torch.backends.cuda, f"can_use_{backend}_attention")(params, True)
            else:
                ok = sdpa_usable(backend, q4, k4, v4, True)
        reason = "; ".join(str(w.message).splitlines()[0][:100] for w in caught)
        verdicts[backend] = "yes" if ok else f"no ({reason})" if reason else "no"
    return verdicts


def _attention_case(scale: Scale, device: torch.device, report: Report, tokens: int) -> list:
    """Our plan and its peak; then Windows simulated (flash and cuDNN off): SDPA's own GQA call (math, O3)
    against our plan for the same inputs, which must stay O(S) and agree."""
    q, k, v = _attention_inputs(scale, tokens, device, torch.Generator(device).manual_seed(tokens))
    verdicts = _backend_reasons(q, k, v)
    kernel = SdpaAttention()
    expected, peak = transient_bytes(lambda: kernel(q, k, v), device)
    plan = next(iter(kernel.plans.values()))
    where = f"attention.s{tokens}"
    report.check(
        f"{where}.plan", INFO, f"{plan.backend}{'+expand' if plan.expand_kv else ''}", note=str(verdicts)
    )
    if peak is not None:
        report.measure(f"{where}.peak_gib", gib(peak) < 0.5, gib(peak), "< 0.5")
    flash, cudnn = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    try:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        _, raw_peak = transient_bytes(
            lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True), device
        )
        fixed = SdpaAttention()
        out, fixed_peak = transient_bytes(lambda: fixed(q, k, v), device)
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    fixed_plan = next(iter(fixed.plans.values()))
    diff = (out.float() - expected.float()).abs().max().item()
    report.check(f"{where}.no_flash_raw_sdpa_peak_gib", INFO, gib(raw_peak), note="SDPA's own choice (O3)")
    if device.type == "cuda":
        fused = fixed_plan.backend in ("efficient", "cudnn")
        report.verify(f"{where}.no_flash_plan_is_fused", fused, fixed_plan.backend)
        report.measure(f"{where}.no_flash_peak_gib", gib(fixed_peak) < 1.0, gib(fixed_peak), "< 1.0")
    report.verify(f"{where}.no_flash_max_diff", diff < 2e-2, diff, "< 2e-2")
    return [
        tokens,
        str(verdicts),
        plan.backend,
        gib(peak),
        gib(raw_peak),
        fixed_plan.backend,
        gib(fixed_peak),
        diff,
    ]


def attention_backends(scale: Scale, device: torch.device, report: Report) -> None:
    rows = [_attention_case(scale, device, report, tokens) for tokens in scale.attention_tokens]
    header = [
        "S",
        "fused kernels (GQA call)",
        "plan",
        "peak GiB",
        "no-flash raw SDPA GiB",
        "no-flash plan",
        "no-flash peak GiB",
        "max |diff|",
    ]
    report.table("SDPA at the real shapes, q/k [1,Hq|Hkv,S,D], v a view of the qkv output", header, rows)
    free(device)

    stream = TokenStream((scale.clip_1080p,))
    q, k, v = _attention_inputs(scale, stream.total, device, torch.Generator(device).manual_seed(5))
    attend = StreamAttention(SdpaAttention(), stream, scale.sr.frame_receptive_field, device)
    rows = []
    for local in (True, False):
        _, peak = transient_bytes(functools.partial(attend, q, k, v, local), device)
        ms = median_ms(functools.partial(attend, q, k, v, local), device, min(scale.repeats, 2))
        kind = "local" if local else "full"
        rows.append([kind, stream.total, ms, gib(peak)])
        if peak is not None and local:
            report.measure("attention.1080p_local_layer_peak_gib", gib(peak) < 2.0, gib(peak), "< 2")
        report.check(f"attention.1080p_{kind}_layer_ms", INFO, ms)
    report.table("1080p StreamAttention, one layer (all heads)", ["layer", "S", "ms", "peak GiB"], rows)


# ---- 8 -----------------------------------------------------------------------------------------------------
def _dequantize_case(scale: Scale, device: torch.device, report: Report, n: int, k: int, name: str) -> list:
    generator = torch.Generator(device).manual_seed(n + k)
    m, weight = scale.gemm_tokens[0], _randn((n, k), generator, device, 0.02)
    layer = Fp8Linear.from_fp8(quantize(weight), mode=DEQUANTIZE)
    x = _randn((m, k), generator, device)
    bf16 = median_ms(lambda: F.linear(x, weight), device, scale.repeats)
    dequantized = median_ms(lambda: layer(x), device, scale.repeats)
    ratio = dequantized / bf16
    report.measure(f"dequantize.{name}_m{m}.time_vs_bf16", ratio <= 1.15, ratio, "<= 1.15")
    return [name, m, bf16, dequantized, ratio, str(layer.compute_dtype)]


def dequantize_path(scale: Scale, device: torch.device, report: Report) -> None:
    rows = [_dequantize_case(scale, device, report, n, k, name) for n, k, name in scale.gemm_shapes]
    header = ["GEMM", "M", "bf16 ms", "dequant ms", "ratio", "GEMM dtype"]
    report.table("dequantize path against bf16", header, rows)
