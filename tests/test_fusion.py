"""Optional torch.compile of the elementwise chains: chosen once per model, never for FP8 casts below sm_89,
and within bf16 noise of eager (compiled on this CPU where a C++ compiler exists)."""

import pytest
import torch
from conftest import FIXTURES
from magihuman.fp8.linear import Fp8Linear, scale_to_fp8, scale_to_fp8_fusible
from magihuman.pipeline.dit import fusion
from magihuman.pipeline.dit.loading import load_dit
from magihuman.pipeline.dit.model import ModalityRMSNorm, gelu7
from safetensors.torch import load_file

FP8 = FIXTURES / "dit_tiny_fp8" / "checkpoint"


def sample():
    golden = load_file(FIXTURES / "dit_tiny_v2" / "tensors.safetensors")
    return golden["input.video_latent"], golden["input.audio_latent"], golden["input.text_embedding"]


def test_fusible_activation_scaling_writes_the_same_bytes_eagerly():
    x = torch.randn(37, 340).bfloat16()
    scale = x.abs().amax().float() / 448
    for padded in (340, 352):
        a, b = scale_to_fp8(x[:, :padded], scale, padded), scale_to_fp8_fusible(x[:, :padded], scale, padded)
        assert a.shape == (37, padded) and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_modes_resolve_once_per_device(monkeypatch):
    assert not fusion.should_fuse("off", "cpu")
    assert not fusion.should_fuse("auto", "cpu")  # eager on CPU unless asked for
    with pytest.raises(ValueError, match="compile mode must be one of auto, on, off"):
        fusion.should_fuse("max", "cpu")
    monkeypatch.setattr(fusion.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="cannot generate kernels on cpu"):
        fusion.should_fuse("on", "cpu")
    model = load_dit(FP8, "base", compute="fp8-matmul")[0]
    assert fusion.fuse(model, "auto", "cpu") == []
    assert all(m.kernel is not None and not isinstance(m.kernel, fusion.Fused) for m in model.modules()
               if isinstance(m, ModalityRMSNorm))  # fmt: skip


@pytest.mark.parametrize(
    ("capability", "casts"), [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]
)
def test_fp8_casts_compile_only_from_sm_89(monkeypatch, capability, casts):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fusion.fp8_casts_compile("cuda") is casts


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("fp8e4nv not supported in this architecture")

    monkeypatch.setattr(fusion.torch, "compile", lambda fn, dynamic: broken)
    fused = fusion.Fused(gelu7)
    u = torch.randn(4, 8).bfloat16()
    assert torch.equal(fused(u), gelu7(u)) and torch.equal(fused(u), gelu7(u))
    assert fused.failed and len(calls) == 1
    assert "torch.compile of gelu7 failed" in caplog.text


@pytest.mark.skipif(not fusion.compile_available("cpu"), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_elementwise_chains_match_eager_within_bf16_noise():
    probe = fusion.Fused(torch.sigmoid)
    probe(torch.ones(3))
    if probe.failed:  # a compiler but no working toolchain (e.g. missing Python headers)
        pytest.skip("torch.compile does not work on this machine")
    model = load_dit(FP8, "base", compute="fp8-matmul")[0]
    inputs = sample()
    with torch.inference_mode():
        eager = model(*inputs)
        names = fusion.fuse(model, "on", "cpu")
        compiled = model(*inputs)
        again = model(*inputs)  # reuses the compiled code
    assert names == ["attention_gate", "gelu7", "modality_rms_norm", "norm_rope", "scale_to_fp8_fusible",
                     "swiglu7"]  # fmt: skip
    swapped = [m.scale_input for m in model.modules() if isinstance(m, Fp8Linear)]
    assert all(isinstance(f, fusion.Fused) and not f.failed for f in swapped)
    for e, c, a in zip(eager, compiled, again, strict=True):
        assert torch.equal(c, a)
        # Inductor keeps some bf16 intermediates in fp32 (no extra rounding): outputs differ by bf16 noise.
        assert (c - e).norm() / e.norm() < 2e-2


@pytest.mark.gpu
def test_gpu_compiled_model_matches_eager_and_compiles_fp8_casts_from_sm_89():
    if not fusion.compile_available("cuda"):
        pytest.skip("no Triton on this GPU")
    model = load_dit(FP8, "base", device="cuda")[0]
    inputs = [t.cuda() for t in sample()]
    with torch.inference_mode():
        eager = model(*inputs)
        names = fusion.fuse(model, "auto", "cuda")
        compiled = model(*inputs)
    assert ("scale_to_fp8_fusible" in names) == (
        fusion.fp8_casts_compile("cuda") and model.block.layers[0].attention.linear_qkv.path == "fp8-matmul"
    )
    fused = [f for m in model.modules() for f in vars(m).values() if isinstance(f, fusion.Fused)]
    assert fused and not any(f.failed for f in fused)
    for e, c in zip(eager, compiled, strict=True):
        assert (c - e).norm() / e.norm() < 2e-2
