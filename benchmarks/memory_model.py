"""A device-free memory model: the device peak of each DiT stage of the full-size models, predicted without
allocating anything (the codecs: :mod:`.memory_codecs`).
Tensors are fake (``FakeTensorMode``: shapes, dtypes and devices, no memory) and a
:class:`~.live_bytes.LiveBytes` counter adds up the storages that are alive, op by op.

* DiT load: the real ``load_dit`` on a sparse full-size checkpoint (the published layout, weights left as
  file holes) to the ``meta`` device; the build's meta placeholders are subtracted (on a GPU they are no
  device memory).
* DiT forward: one forward of the full model with fake CPU tensors, its FP8 linears switched to the GPU's
  ``fp8-matmul`` path with bf16 outputs, attention through SDPA (whose fake CPU kernel, like flash
  attention on a GPU, keeps O(S) memory). The fp32 residual, norms and activations are what a GPU runs.
* Block swap with N layers (the last N, as ``BlockSwap`` swaps them): the forward's peak minus the swapped
  layers' weights plus the two largest of them in flight (the one computing and the one being prefetched).

Not counted: the CUDA context and cuBLAS workspace (about 0.5-0.8 GB) and allocator fragmentation.
"""

import dataclasses
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..fp8.capability import FP8_MATMUL
from ..fp8.linear import Fp8Linear
from ..pipeline.dit.attention import make_attention
from ..pipeline.dit.config import PRESETS, DiTConfig
from ..pipeline.dit.linear import Bf16Linear
from ..pipeline.dit.loading import load_dit
from ..pipeline.dit.model import MagiDiT
from .dit_forward import CLIPS, TEXT_TOKENS, clip_inputs, reduced
from .dit_load import FULL_SIZE_SHARD_BYTES, write_fp8_checkpoint
from .live_bytes import LiveBytes
from .memory_codecs import predict_decode, predict_text_encoder

GIB = 2**30


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def predict_load(config: DiTConfig) -> tuple[int, int]:
    """(device peak while loading, resident model) in bytes, for the FP8 checkpoint of ``config``."""
    with tempfile.TemporaryDirectory(prefix="magihuman-memory-") as workdir:
        folder = Path(workdir) / "distill_fp8"
        write_fp8_checkpoint(folder, config, shard_bytes=FULL_SIZE_SHARD_BYTES, sparse=True)
        placeholders = MagiDiT(
            config, linear_cls=functools.partial(Fp8Linear, mode=FP8_MATMUL), device="meta"
        )
        placeholder_bytes = storage_bytes([*placeholders.parameters(), *placeholders.buffers()])
        del placeholders
        with LiveBytes(device="meta") as counter:
            model, _ = load_dit(folder, config_variant(config), compute=FP8_MATMUL, device="meta")
        resident = storage_bytes([*model.parameters(), *model.buffers()])
    return counter.peak - placeholder_bytes, resident


def config_variant(config: DiTConfig) -> str:
    return "sr_1080p" if config.local_attn_layers else "distill"


def fake_dit(config: DiTConfig, linear: str, fake: FakeTensorMode) -> MagiDiT:
    """The DiT with fake CPU weights, running the GPU's paths (FP8: ``_scaled_mm``; bf16 dequantize dtype)."""
    linear_cls = functools.partial(Fp8Linear, mode="auto") if linear == "fp8" else Bf16Linear
    model = MagiDiT(config, linear_cls=linear_cls, attention=make_attention("sdpa"), device="meta")
    shapes = {key: (t.shape, t.dtype) for key, t in model.state_dict(keep_vars=True).items()}
    with fake:
        state = {}
        for key, (shape, dtype) in shapes.items():
            owner = model.get_submodule(key.rpartition(".")[0])
            if isinstance(owner, Fp8Linear) and key.endswith(".weight"):
                state[key] = owner.empty_weight("cpu")  # padded as loaded
            else:
                state[key] = torch.empty(shape, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.path, module.compute_dtype = FP8_MATMUL, torch.bfloat16  # a GPU of compute capability 8.9+
    return model.eval()


@dataclass(frozen=True)
class ForwardPrediction:
    clip: str
    linear: str
    tokens: int
    resident: int  # weights (and inputs) in bytes
    activations: int  # peak above resident during one forward
    layers: tuple[int, ...]  # weight bytes of each transformer layer


def predict_forward(config: DiTConfig, linear: str, clip: str, frame_scale: float = 1.0) -> ForwardPrediction:
    name, width, height, _ = next(c for c in CLIPS if c[0] == clip)
    fake = FakeTensorMode()
    model = fake_dit(config, linear, fake)
    with fake, torch.inference_mode():
        sample = clip_inputs(width, height, "cpu", scale=frame_scale)
        counter = LiveBytes()
        for tensor in [*model.parameters(), *model.buffers(), *sample]:
            counter.track(tensor)
        resident = counter.live
        with counter:
            model(*sample)
    layers = [storage_bytes([*layer.parameters(), *layer.buffers()]) for layer in model.block.layers]
    video = sample[0].shape
    tokens = video[2] * video[3] * video[4] // 4 + sample[1].shape[1] + TEXT_TOKENS
    return ForwardPrediction(name, linear, tokens, resident, counter.peak - resident, tuple(layers))


def measure_forward_cpu(config: DiTConfig, clip: str, frame_scale: float) -> tuple[int, int]:
    """(resident, activation peak) of one real CPU forward of ``config`` with the same paths as the fake
    run (FP8 ``_scaled_mm``, which torch's CPU build emulates), counted on real storages: the check of the
    model."""
    name, width, height, _ = next(c for c in CLIPS if c[0] == clip)
    model = fake_dit(config, "fp8", FakeTensorMode())  # for the shapes only
    real = MagiDiT(config, linear_cls=functools.partial(Fp8Linear, mode="auto"), device="meta")
    state = {}
    for key, tensor in real.state_dict(keep_vars=True).items():
        owner = real.get_submodule(key.rpartition(".")[0])
        if isinstance(owner, Fp8Linear) and key.endswith(".weight"):
            state[key] = (
                owner.empty_weight("cpu").view(torch.uint8).random_(0, 0x70).view(torch.float8_e4m3fn)
            )
        elif tensor.dtype.is_floating_point:
            state[key] = torch.randn(tensor.shape).mul_(0.02).to(tensor.dtype)
        else:
            state[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    real.load_state_dict(state, strict=True, assign=True)
    del state, model
    for module in real.modules():
        if isinstance(module, Fp8Linear):
            module.path, module.compute_dtype = FP8_MATMUL, torch.bfloat16
    torch.manual_seed(0)
    sample = clip_inputs(width, height, "cpu", scale=frame_scale)
    counter = LiveBytes(device="cpu")
    for tensor in [*real.parameters(), *real.buffers(), *sample]:
        counter.track(tensor)
    resident = counter.live
    with counter, torch.inference_mode():
        real(*sample)
    return resident, counter.peak - resident


def bench_memory(validate: bool = True) -> str:
    lines = ["Device-free memory model: fake tensors and a live-storage counter (nothing allocated).", ""]
    if validate:
        config = dataclasses.replace(reduced(PRESETS["distill"]))
        fake = predict_forward(config, "fp8", "256p", frame_scale=0.125)
        resident, peak = measure_forward_cpu(config, "256p", frame_scale=0.125)
        error = (fake.activations - peak) / peak
        lines += [
            "Check: reduced-width stand-in (hidden 1024, 8 layers), 256p at 1/8 of the frames, FP8 path:",
            f"  predicted activations {fake.activations / GIB:.3f} GiB, measured on this CPU (real tensors) "
            f"{peak / GIB:.3f} GiB: {100 * error:+.1f} %; weights {fake.resident / GIB:.3f} vs "
            f"{resident / GIB:.3f} GiB",
            "",
        ]
    load_peak, resident = predict_load(PRESETS["distill"])
    lines += [
        f"DiT load (FP8, to the device): peak {load_peak / GIB:.2f} GiB, resident {resident / GIB:.2f} GiB",
        "",
        f"{'clip':<7}{'linear':<7}{'tokens':>8}{'weights GiB':>13}{'activations GiB':>17}{'peak GiB':>10}",
    ]
    predictions = []
    for clip, preset in (("256p", "distill"), ("540p", "sr_540p"), ("1080p", "sr_1080p")):
        for linear in ("fp8", "bf16"):
            p = predict_forward(PRESETS[preset], linear, clip)
            predictions.append(p)
            lines.append(
                f"{p.clip:<7}{p.linear:<7}{p.tokens:>8}{p.resident / GIB:>13.2f}{p.activations / GIB:>17.2f}"
                f"{(p.resident + p.activations) / GIB:>10.2f}"
            )
    lines += ["", "Block swap (FP8): device peak GiB with the last N layers swapped (two of them in flight)"]
    lines.append(f"{'clip':<7}" + "".join(f"{f'N={n}':>9}" for n in SWAP_COUNTS))
    for p in (p for p in predictions if p.linear == "fp8"):
        peaks = [swap_peak(p, n) for n in SWAP_COUNTS]
        lines.append(f"{p.clip:<7}" + "".join(f"{peak / GIB:>9.2f}" for peak in peaks))
    lines += ["", "Codecs (bf16 unless named; text encoder: a 640-token prompt; decoders: a 5 s clip)"]
    lines.append(f"{'stage':<28}{'weights GiB':>13}{'activations GiB':>17}{'peak GiB':>10}")
    codecs = [predict_text_encoder(fp8=False), predict_text_encoder(fp8=True)]
    codecs += [predict_decode(d, size) for d in ("turbo", "wan") for size in ("256p", "540p", "1080p")]
    for c in codecs:
        lines.append(
            f"{c.name:<28}{c.resident / GIB:>13.2f}{c.activations / GIB:>17.2f}"
            f"{(c.resident + c.activations) / GIB:>10.2f}"
        )
    return "\n".join(lines)


SWAP_COUNTS = (0, 4, 8, 12, 16, 20, 24)


def swap_peak(p: ForwardPrediction, count: int) -> int:
    """Device peak with the last ``count`` layers swapped: they leave the device except two in flight."""
    if not count:
        return p.resident + p.activations
    swapped = sorted(p.layers[len(p.layers) - count :])
    return p.resident + p.activations - sum(swapped) + sum(swapped[-2:])
