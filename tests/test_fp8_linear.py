"""The FP8 linear: parity with the published FP8 runtime, both paths vs fp32, padding, loading, modes."""

import pytest
import torch
from conftest import FIXTURES, load_tensors
from magihuman.benchmarks.live_bytes import LiveBytes
from magihuman.fp8 import capability
from magihuman.fp8 import linear as fp8_linear
from magihuman.fp8.capability import choose_path, supports_fp8_matmul, supports_rowwise_scaled_mm
from magihuman.fp8.linear import Fp8Linear
from magihuman.fp8.quantize import Fp8Weight, Granularity, quantize, sqnr_db
from safetensors.torch import load_file
from torch import nn

GOLDEN = FIXTURES / "dit_tiny_fp8"
# (module, probe, splits, experts): tokens are grouped 18 video | 9 audio | 7 text in the golden inputs.
PROBES = [
    ("block.layers.0.attention.linear_qkv", "probe.layer0.linear_qkv", (18, 9, 7), 3),  # N = 200: pads rows
    ("block.layers.2.mlp.up_gate_proj", "probe.layer2.up_gate_proj", None, 1),  # N = 680: pads rows
    ("block.layers.2.mlp.down_proj", "probe.layer2.down_proj", None, 1),  # K = 340: pads columns
]


def golden(module: str) -> Fp8Weight:
    published = load_tensors(GOLDEN / "checkpoint")
    return Fp8Weight(published[module + ".weight"], published[module + ".weight.__fp8_scale"])


def bf16_ulps(y: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|y − ref| in units of the bf16 spacing at ref (8 significant bits)."""
    reference = reference.float()
    spacing = 2.0 ** (torch.floor(torch.log2(reference.abs().clamp(min=2**-126))) - 7)
    return (y.float() - reference).abs() / spacing


def random_case(tokens: int, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=generator).bfloat16()
    weight = torch.randn(n, k, generator=generator) * 0.02
    return x, weight, x.float() @ weight.T


@pytest.mark.parametrize("module, probe, splits, experts", PROBES)
def test_fp8_matmul_path_matches_the_published_runtime(module, probe, splits, experts):
    probes = load_file(GOLDEN / "tensors.safetensors")
    layer = Fp8Linear.from_fp8(golden(module), experts, mode="fp8-matmul")
    y = layer(probes[probe + ".in"], splits)
    # Same recipe as the recorded run (dynamic per-tensor activation scale per expert group, torch 2.13 CPU
    # _scaled_mm): only the final bf16 rounding of an element may land on the neighbouring value.
    assert y.dtype == torch.bfloat16 and y.shape == probes[probe + ".out"].shape
    assert bf16_ulps(y, probes[probe + ".out"]).max() <= 1.0


@pytest.mark.parametrize("module, probe, splits, experts", PROBES)
def test_dequantize_path_computes_the_same_function(module, probe, splits, experts):
    probes = load_file(GOLDEN / "tensors.safetensors")
    y = Fp8Linear.from_fp8(golden(module), experts, mode="dequantize")(probes[probe + ".in"], splits)
    # The recorded run also rounded activations to e4m3 (~31.5 dB of noise); the dequantize path does not.
    assert sqnr_db(probes[probe + ".out"], y) > 30.0


@pytest.mark.parametrize(
    "tokens, n, k",
    [
        (64, 256, 512),
        (1, 7208, 64),  # N of linear_qkv (not a multiple of 16), one token
        (17, 27304, 32),  # N of a shared up_gate_proj, M not a multiple of 16
        (17, 81912, 32),  # N of a sandwich up_gate_proj (3 experts stacked)
        (33, 24, 13652),  # K of down_proj (not a multiple of 16)
    ],
)
def test_both_paths_against_fp32_on_awkward_shapes(tokens, n, k):
    x, weight, reference = random_case(tokens, n, k)
    fp8 = quantize(weight)
    matmul = Fp8Linear.from_fp8(fp8, mode="fp8-matmul")(x)
    dequantized = Fp8Linear.from_fp8(fp8, mode="dequantize")(x)
    assert matmul.shape == dequantized.shape == (tokens, n)
    # Weights alone in e4m3: ~31.5 dB; weights and activations both in e4m3 (fp8-matmul): ~28.5 dB (measured
    # 28.5-29.3). The two paths differ by the activation rounding only (~31.5 dB).
    assert sqnr_db(reference, dequantized) > 30.0
    assert sqnr_db(reference, matmul) > 27.0
    assert sqnr_db(dequantized, matmul) > 30.0


@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("mode", ["fp8-matmul", "dequantize"])
def test_experts_with_every_scale_granularity_and_an_empty_group(granularity, mode):
    n, k, splits = 40, 48, (5, 0, 12)  # N and K pad; the audio expert gets no tokens
    x, weight, _ = random_case(sum(splits), 3 * n, k)
    weight[n : 2 * n] *= 100  # experts of very different size
    fp8 = quantize(weight, granularity, num_experts=3)
    layer = Fp8Linear.from_fp8(fp8, num_experts=3, mode=mode)
    assert layer.granularity is granularity
    y = layer(x, splits)
    dense = x.float() @ fp8.dequantize(torch.float32).T  # every token through every expert
    reference = torch.cat([dense[:5, :n], dense[5:, 2 * n :]])
    assert y.shape == (17, n) and sqnr_db(reference, y) > (28.0 if mode == "fp8-matmul" else 40.0)
    assert layer(x[:0], (0, 0, 0)).shape == (0, n)


@pytest.mark.parametrize("mode", ["fp8-matmul", "dequantize"])
def test_long_inputs_run_in_row_chunks_quantized_as_one_and_activated_chunk_by_chunk(monkeypatch, mode):
    """Above ROW_CHUNK_ELEMENTS of output an expert's rows go through the GEMM in chunks, each quantized with
    the scale of all the expert's rows, and an epilogue sees each chunk as it is made: the same values as
    one call, without the whole [S, N] output ever existing."""
    n, k, splits = 168, 48, (2300, 0, 750)  # N and K pad; the audio expert gets no tokens
    x, weight, _ = random_case(sum(splits), 3 * n, k, seed=2)
    x[:2200] *= 1e-3  # the video expert's scale comes from its last rows: a chunk's own amax would differ
    layer = Fp8Linear.from_fp8(quantize(weight, num_experts=3), num_experts=3, mode=mode)
    halve = lambda y: y[:, 0::2].float().mul(2).to(torch.bfloat16)  # noqa: E731 (a row-wise activation)
    whole, whole_halved = layer(x, splits), halve(layer(x, splits))
    calls = []
    monkeypatch.setattr(fp8_linear, "ROW_CHUNK_ELEMENTS", 100 * n)  # 100 rows per GEMM
    with LiveBytes(device="cpu") as counter:
        halved = layer(x, splits, epilogue=lambda y: calls.append(y.shape[0]) or halve(y))
    assert calls == [100] * 23 + [100] * 7 + [50]  # per expert, never across experts; none for audio
    assert torch.equal(halved, whole_halved)
    assert counter.peak < 0.7 * whole.nbytes  # the halved result and one chunk, not the whole output
    assert torch.equal(layer(x, splits), whole)


def row_scaled_case():
    n, k, splits = 40, 48, (5, 0, 12)
    x, weight, _ = random_case(sum(splits), 3 * n, k, seed=1)
    weight[n : 2 * n] *= 100
    return x, quantize(weight, Granularity.ROW, num_experts=3), splits


def test_row_scales_without_rowwise_scaled_mm_compute_the_same_product(monkeypatch):
    """Where row-wise _scaled_mm is missing (Windows, older sm_89 and some Blackwell builds), the per-tensor
    GEMM with its output columns scaled afterwards gives the row-wise result (one extra bf16 rounding)."""
    if not supports_rowwise_scaled_mm("cpu"):
        pytest.skip("this torch build has no row-wise CPU _scaled_mm to compare against")
    x, fp8, splits = row_scaled_case()
    direct = Fp8Linear.from_fp8(fp8, 3, mode="fp8-matmul")
    monkeypatch.setattr(fp8_linear, "supports_rowwise_scaled_mm", lambda device, fast_accum=False: False)
    fallback = Fp8Linear.from_fp8(fp8, 3, mode="fp8-matmul")
    assert direct.rowwise and not fallback.rowwise
    y, expected = fallback(x, splits), direct(x, splits)
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    assert bf16_ulps(y, expected).max() <= 1.0
    reference = Fp8Linear.from_fp8(fp8, 3, mode="dequantize")(x, splits)
    assert sqnr_db(reference, y) > 30.0


def test_rowwise_support_is_probed_once_per_device(monkeypatch):
    calls = []
    real = torch._scaled_mm

    def no_rowwise(a, b, scale_a, scale_b, **kwargs):
        calls.append(scale_a.shape)
        if scale_a.numel() > 1:
            raise RuntimeError("Rowwise scaling is not currently supported on your device")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    capability._rowwise_probe.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", no_rowwise)
    try:
        x, fp8, splits = row_scaled_case()
        layers = [Fp8Linear.from_fp8(fp8, 3, mode="fp8-matmul") for _ in range(3)]
        probes = len(calls)
        assert probes == 1 and not any(layer.rowwise for layer in layers)
        y = layers[0](x, splits)  # would raise if the row-wise recipe were used
        reference = Fp8Linear.from_fp8(fp8, 3, mode="dequantize")(x, splits)
        assert sqnr_db(reference, y) > 30.0
        assert all(shape.numel() == 1 for shape in calls[probes:])
    finally:
        capability._rowwise_probe.cache_clear()


def test_bias_is_added_after_the_product():
    x, weight, reference = random_case(9, 32, 64)
    bias = torch.linspace(-1, 1, 32)
    for mode in ("fp8-matmul", "dequantize"):
        y = Fp8Linear.from_fp8(quantize(weight), bias=bias, mode=mode)(x)
        assert sqnr_db(reference + bias, y) > 27.0


def test_weight_is_padded_once_at_load_and_saved_in_checkpoint_shape():
    fp8 = quantize(torch.randn(3 * 200, 340))  # N = 200 and K = 340 both need padding
    layer = Fp8Linear.from_fp8(fp8, num_experts=3)
    assert layer.weight_padded.shape == (3 * 200 + 8, 352)  # one padding tail, not one per expert
    assert layer.weight.shape == (600, 340) and layer.weight.data_ptr() == layer.weight_padded.data_ptr()
    assert torch.equal(layer.weight.view(torch.uint8), fp8.data.view(torch.uint8))
    assert not layer.weight_padded[:, 340:].view(torch.uint8).any()  # zero K padding: adds nothing
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale"} and state["weight"].shape == (600, 340)

    aligned = quantize(torch.randn(32, 64))  # nothing to pad: the loaded tensor itself is kept
    layer = Fp8Linear.from_fp8(aligned)
    assert layer.weight_padded.data_ptr() == aligned.data.data_ptr()


class TwoLayers(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.qkv = linear(64, 40, num_experts=3)
        self.proj = linear(40, 64)


def test_meta_build_and_strict_assign_load_as_the_dit_loader_does():
    qkv, proj = quantize(torch.randn(120, 64), Granularity.ROW), quantize(torch.randn(64, 40))
    state = qkv.state_dict("qkv.") | proj.state_dict("proj.")
    with torch.device("meta"):
        model = TwoLayers(Fp8Linear)
    assert model.qkv.path is None  # no real device yet
    model.load_state_dict(state, strict=True, assign=True)
    assert model.qkv.path == choose_path("auto", "cpu") and model.qkv.granularity is Granularity.ROW
    saved = model.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in state.items()}
    assert torch.equal(saved["qkv.weight_scale"], qkv.scale)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"qkv.weight.__fp8_scale"'):
        model.load_state_dict(state | {"qkv.weight.__fp8_scale": qkv.scale}, strict=True, assign=True)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"proj.weight_scale"'):
        model.load_state_dict({k: v for k, v in state.items() if k != "proj.weight_scale"}, assign=True)


def test_scale_loss_is_impossible():
    layer = Fp8Linear(64, 32)
    # High-precision weights are refused: an FP8 linear gets FP8 data with its scale, or nothing.
    with pytest.raises(RuntimeError, match="expected float8_e4m3fn"):
        layer.load_state_dict({"weight": torch.randn(32, 64).bfloat16(), "weight_scale": torch.tensor(1.0)})
    with pytest.raises(RuntimeError, match="weight_scale must be float32"):
        layer.load_state_dict(quantize(torch.randn(32, 64)).state_dict() | {"weight_scale": torch.ones(5)})
    # Whole-model dtype moves would upcast FP8 values without their scale: refused; device moves are fine.
    layer = Fp8Linear.from_fp8(quantize(torch.randn(32, 64)))
    for convert in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        with pytest.raises(TypeError, match="drops or degrades the FP8 scales"):
            convert(nn.Sequential(layer))
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert nn.Sequential(layer).to("cpu")[0] is layer


def test_modes_are_resolved_once_and_can_be_forced():
    fp8 = quantize(torch.randn(32, 64))
    assert Fp8Linear.from_fp8(fp8, mode="dequantize").path == "dequantize"
    assert Fp8Linear.from_fp8(fp8, mode="auto").path == "dequantize"  # CPU: the measured faster path
    if supports_fp8_matmul("cpu"):
        assert Fp8Linear.from_fp8(fp8, mode="fp8-matmul").path == "fp8-matmul"
    assert Fp8Linear(64, 32, device="cpu", mode="dequantize").path == "dequantize"  # built on a real device
    with pytest.raises(ValueError, match="mode must be one of auto, fp8-matmul, dequantize"):
        Fp8Linear(64, 32, mode="fast")
    with pytest.raises(ValueError, match="3 experts got 1 splits"):
        Fp8Linear.from_fp8(quantize(torch.randn(96, 64)), num_experts=3)(torch.randn(4, 64).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", list(Granularity))
def test_gpu_fp8_matmul_agrees_with_dequantize_without_host_sync(granularity):
    device = torch.device("cuda")
    n, k, splits = 7208, 13652 // 4, (37, 0, 20)  # N and K both need padding
    x, weight, _ = random_case(sum(splits), 3 * n, k)
    fp8 = quantize(weight.to(device), granularity, num_experts=3)
    fast = Fp8Linear.from_fp8(fp8, 3, mode="auto")
    assert fast.path == ("fp8-matmul" if supports_fp8_matmul(device) else "dequantize")
    if fast.path != "fp8-matmul":
        pytest.skip("this GPU has no FP8 matmul (compute capability < 8.9)")
    x = x.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside forward raises
    try:
        y = fast(x, splits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = Fp8Linear.from_fp8(fp8, 3, mode="dequantize")(x, splits)
    assert y.dtype == torch.bfloat16 and sqnr_db(reference, y) > 30.0


@pytest.mark.gpu
def test_gpu_row_scales_without_rowwise_kernel_agree_with_dequantize(monkeypatch):
    device = torch.device("cuda")
    if not supports_fp8_matmul(device):
        pytest.skip("this GPU has no FP8 matmul (compute capability < 8.9)")
    monkeypatch.setattr(fp8_linear, "supports_rowwise_scaled_mm", lambda device, fast_accum=False: False)
    n, k, splits = 7208, 5120, (37, 0, 20)
    x, weight, _ = random_case(sum(splits), 3 * n, k)
    fp8 = quantize(weight.to(device), Granularity.ROW, num_experts=3)
    layer = Fp8Linear.from_fp8(fp8, 3, mode="fp8-matmul")
    assert not layer.rowwise
    y = layer(x.to(device), splits)
    reference = Fp8Linear.from_fp8(fp8, 3, mode="dequantize")(x.to(device), splits)
    assert sqnr_db(reference, y) > 30.0


@pytest.mark.gpu
def test_gpu_module_moves_between_devices_and_repicks_its_path():
    layer = Fp8Linear.from_fp8(quantize(torch.randn(40, 72)))
    assert layer.path == "dequantize"
    layer.to("cuda")
    assert layer.weight.is_cuda and layer.path == choose_path("auto", "cuda")
    x = torch.randn(5, 72, device="cuda").bfloat16()
    assert layer(x).shape == (5, 40)
