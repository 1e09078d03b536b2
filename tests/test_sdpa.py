"""SDPA backend choice: once per shape class, logged, never the O(S²) math kernel; every plan computes the
same attention. Backend availability is forced through the probe (CPU) and through torch's flags."""

import logging

import pytest
import torch
from magihuman.pipeline.dit import attention, sdpa
from magihuman.pipeline.dit.sdpa import SdpaAttention, SdpaPlan, choose_plan, sdpa_usable


def inputs(heads_q=8, heads_kv=2, tokens=48, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(tokens, h, dim, generator=gen).to(torch.bfloat16) for h in (heads_q, heads_kv, heads_kv)
    ]


def reference(q, k, v):
    """float64 softmax(q kᵀ/√Dh) v with K/V heads repeated by hand."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def forced(available: set[str], cudnn_gqa: bool = True):
    """A probe with CUDA's rules: flash takes GQA, memory-efficient needs equal head counts, cuDNN takes GQA
    only where ``cudnn_gqa`` (new cuDNN); only the ``available`` kernels exist."""
    calls = []

    def usable(backend, q, k, v, gqa):
        calls.append((backend, k.shape[1], gqa))
        grouped = gqa or q.shape[1] != k.shape[1]
        if backend not in available:
            return False
        return not grouped or backend == "flash" or (backend == "cudnn" and cudnn_gqa)

    usable.calls = calls
    return usable


@pytest.mark.parametrize(
    ("available", "cudnn_gqa", "expected"),
    [
        ({"flash", "efficient", "cudnn"}, True, SdpaPlan("flash", False)),  # Linux wheels
        ({"efficient", "cudnn"}, False, SdpaPlan("efficient", True)),  # Windows: no flash
        ({"flash", "cudnn"}, True, SdpaPlan("flash", False)),  # efficient off
        ({"cudnn"}, True, SdpaPlan("cudnn", False)),  # flash and efficient off, GQA-capable cuDNN
        ({"cudnn"}, False, SdpaPlan("cudnn", True)),  # older cuDNN: expand
        ({"flash", "efficient"}, True, SdpaPlan("flash", False)),  # cuDNN off
        ({"efficient"}, True, SdpaPlan("efficient", True)),  # flash and cuDNN off
        (set(), True, SdpaPlan("chunked", True)),  # no fused kernel at all: bounded chunks, never math
    ],
)
def test_plan_follows_backend_availability_and_every_plan_agrees(available, cudnn_gqa, expected):
    q, k, v = inputs()
    kernel = SdpaAttention(forced(available, cudnn_gqa))
    out = kernel(q, k, v)
    assert list(kernel.plans.values()) == [expected]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # bf16 output against float64: within two bf16 ulps of |o| < 1.
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=0, atol=1e-2)


def test_equal_head_counts_never_expand():
    q, k, v = inputs(heads_q=4, heads_kv=4)
    kernel = SdpaAttention(forced({"efficient"}))
    kernel(q, k, v)
    assert list(kernel.plans.values()) == [SdpaPlan("efficient", False)]


def test_the_plan_is_chosen_and_logged_once_per_shape_class(caplog):
    probe = forced({"efficient"})
    kernel = SdpaAttention(probe)
    q, k, v = inputs()
    with caplog.at_level(logging.INFO, logger=sdpa.__name__):
        kernel(q, k, v)
        probed = len(probe.calls)
        kernel(*inputs(tokens=77, seed=1))  # another length: same class, no new probe
        assert len(probe.calls) == probed
        kernel(q.float(), k.float(), v.float())  # another dtype: a new class
    assert len(kernel.plans) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "SDPA efficient with K/V heads expanded" in messages[0]


def test_chunked_attention_is_exact_across_chunks(monkeypatch):
    monkeypatch.setattr(sdpa, "CHUNK_SCORES", 8 * 48 * 5)  # 5 query rows per chunk: 10 chunks, last short
    q, k, v = inputs(tokens=48)
    out = SdpaAttention(forced(set()))(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=0, atol=1e-2)


@pytest.fixture
def flash_flag():
    enabled = torch.backends.cuda.flash_sdp_enabled()
    yield
    torch.backends.cuda.enable_flash_sdp(enabled)


def test_torch_flags_drive_the_real_probe(flash_flag):
    """On CPU, torch has one fused kernel (flash, with GQA); turning it off must not leave SDPA's math
    kernel running: the plan becomes the bounded chunked path, with the same result."""
    q, k, v = inputs()
    expected = reference(q, k, v)
    with_flash = SdpaAttention()
    torch.testing.assert_close(with_flash(q, k, v).double(), expected, rtol=0, atol=1e-2)
    assert list(with_flash.plans.values()) == [SdpaPlan("flash", False)]
    torch.backends.cuda.enable_flash_sdp(False)
    without = SdpaAttention()
    torch.testing.assert_close(without(q, k, v).double(), expected, rtol=0, atol=1e-2)
    assert list(without.plans.values()) == [SdpaPlan("chunked", True)]


def test_cpu_probe_only_knows_flash():
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in inputs())
    assert sdpa_usable("flash", q, k, v, True)
    assert not sdpa_usable("efficient", q, k, v, True) and not sdpa_usable("cudnn", q, k, v, True)
    assert choose_plan(q, k, v) == SdpaPlan("flash", False)


@pytest.mark.parametrize(("capability", "fa3"), [((9, 0), True), ((8, 9), False), ((12, 0), False)])
def test_fa3_is_taken_on_hopper_only(monkeypatch, capability, fa3):
    real_find_spec = attention.importlib.util.find_spec
    monkeypatch.setattr(
        attention.importlib.util,
        "find_spec",
        lambda name: object() if name == "flash_attn_interface" else real_find_spec(name),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert attention._fa3_usable() is fa3


@pytest.mark.gpu
def test_gpu_without_flash_runs_an_o_s_kernel_at_256p(flash_flag):
    """Windows simulated: flash and cuDNN off. SDPA's own choice would be math (~2.6 GB of scores)."""
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (
            torch.randn(4010, h, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for h in (40, 8, 8)
        )
        kernel = SdpaAttention()
        kernel(q, k, v)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = kernel(q, k, v)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    assert list(kernel.plans.values()) == [SdpaPlan("efficient", True)]
    assert peak < 2**30
    expected = reference(q[:256].cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(out[:256].cpu().double(), expected, rtol=0, atol=2e-2)
