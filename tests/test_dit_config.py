"""DiTConfig: presets, the 331-key checkpoint manifest of the real model, and config inference from shapes."""

import dataclasses
import re

import pytest
import torch
from conftest import FIXTURES
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.pipeline.dit.config import PRESETS, DiTConfig
from magihuman.pipeline.dit.model import MagiDiT

FULL_PRESETS = ("base", "distill", "sr_540p", "sr_1080p")
BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.linear_(qkv|proj)|mlp\.(up_gate|down)_proj)\.weight"
)


def tiny_checkpoint_shapes():
    ckpt = Checkpoint(FIXTURES / "dit_tiny_weights")
    return {key: ckpt.info(key).shape for key in ckpt.keys()}


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_full_presets_build_on_meta_with_the_331_checkpoint_keys(name):
    model = MagiDiT(PRESETS[name], device="meta")
    state = model.state_dict()
    assert len(state) == 331
    assert {key: tuple(t.shape) for key, t in state.items()} == PRESETS[name].expected_shapes()
    assert sum(t.numel() for t in state.values()) == 15_299_419_152 == PRESETS[name].num_parameters()
    linears = [key for key in state if BLOCK_LINEAR.fullmatch(key)]
    assert len(linears) == 160
    for key, tensor in state.items():
        assert tensor.dtype == (torch.bfloat16 if key in linears else torch.float32), key


def test_full_shapes_match_the_spec_table():
    """ARCHITECTURE.md §1.8, one layer of each kind plus the non-block tensors."""
    shapes = PRESETS["base"].expected_shapes()
    spec = {
        0: ([15360], [21624, 5120], [15360, 5120], [384], [61440, 5120], [15360, 20480]),
        4: ([5120], [7208, 5120], [5120, 5120], [128], [27304, 5120], [5120, 13652]),
        39: ([15360], [21624, 5120], [15360, 5120], [384], [81912, 5120], [15360, 13652]),
    }
    for i, (norm, qkv, proj, qk_norm, up, down) in spec.items():
        p = f"block.layers.{i}."
        assert list(shapes[p + "attention.pre_norm.weight"]) == norm
        assert list(shapes[p + "mlp.pre_norm.weight"]) == norm
        assert list(shapes[p + "attention.linear_qkv.weight"]) == qkv
        assert list(shapes[p + "attention.linear_proj.weight"]) == proj
        assert list(shapes[p + "attention.q_norm.weight"]) == qk_norm
        assert list(shapes[p + "attention.k_norm.weight"]) == qk_norm
        assert list(shapes[p + "mlp.up_gate_proj.weight"]) == up
        assert list(shapes[p + "mlp.down_proj.weight"]) == down
    assert shapes["adapter.text_embedder.weight"] == (5120, 3584)
    assert shapes["adapter.video_embedder.weight"] == (5120, 192)
    assert shapes["adapter.audio_embedder.weight"] == (5120, 64)
    assert shapes["adapter.rope.bands"] == (16,)
    assert shapes["final_linear_video.weight"] == (192, 5120)
    assert shapes["final_linear_audio.weight"] == (64, 5120)


def test_variants_differ_only_in_coordinates_and_local_attention():
    base = PRESETS["base"]
    assert (base.coords_style, base.local_attn_layers) == ("v2", ())
    assert PRESETS["distill"] == base
    assert (PRESETS["sr_540p"].coords_style, PRESETS["sr_540p"].local_attn_layers) == ("v1", ())
    sr = PRESETS["sr_1080p"]
    assert sr.coords_style == "v1" and sr.frame_receptive_field == 11
    assert len(sr.local_attn_layers) == 32
    assert sorted(set(range(40)) - set(sr.local_attn_layers)) == [3, 7, 11, 15, 19, 23, 27, 31]
    for name in FULL_PRESETS:
        assert PRESETS[name].expected_shapes() == base.expected_shapes()


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_from_shapes_recovers_each_full_preset(name):
    assert DiTConfig.from_shapes(PRESETS[name].expected_shapes(), name) == PRESETS[name]


def test_from_shapes_reads_the_tiny_golden_checkpoint():
    shapes = tiny_checkpoint_shapes()
    config = DiTConfig.from_shapes(shapes, "base")
    # The fixture's recorded ModelConfig (golden README, dit_tiny_weights).
    assert config == PRESETS["tiny"]
    assert (config.num_layers, config.hidden_size, config.head_dim) == (6, 128, 16)
    assert (config.num_heads_q, config.num_heads_kv, config.enable_attn_gating) == (8, 2, True)
    assert (config.mm_layers, config.gelu7_layers) == ((0, 1, 4, 5), (0, 1))
    assert (config.gelu7_intermediate, config.swiglu7_intermediate) == (512, 340)
    # dit_tiny_v1_local ran local attention on layers [0, 1, 2, 4, 5]: the sr_1080p rule on 6 layers.
    assert DiTConfig.from_shapes(shapes, "sr_1080p").local_attn_layers == (0, 1, 2, 4, 5)
    assert DiTConfig.from_shapes(shapes, "tiny_sr_1080p") == PRESETS["tiny_sr_1080p"]


def test_from_shapes_ignores_foreign_keys_such_as_fp8_scales():
    shapes = dict(PRESETS["base"].expected_shapes())
    shapes["block.layers.0.attention.linear_qkv.weight.__fp8_scale"] = ()
    assert DiTConfig.from_shapes(shapes, "base") == PRESETS["base"]


def test_from_shapes_rejects_what_is_not_a_magihuman_dit():
    good = PRESETS["tiny"].expected_shapes()
    missing = {k: v for k, v in good.items() if k != "block.layers.2.mlp.pre_norm.weight"}
    with pytest.raises(ValueError, match=r"block\.layers\.2\.mlp\.pre_norm\.weight' is missing"):
        DiTConfig.from_shapes(missing, "base")
    wrong = dict(good, **{"block.layers.3.mlp.down_proj.weight": (128, 300)})
    with pytest.raises(ValueError, match=r"block\.layers\.3\.mlp\.down_proj\.weight' has shape \[128, 300\]"):
        DiTConfig.from_shapes(wrong, "base")
    with pytest.raises(ValueError, match="adapter.video_embedder.weight' is missing"):
        DiTConfig.from_shapes({"decoder.conv_in.weight": (512, 48, 3, 3, 3)}, "base")
    with pytest.raises(ValueError, match="unknown DiT variant 'sr_720p'"):
        DiTConfig.from_shapes(good, "sr_720p")


def test_config_validation_names_the_field():
    tiny = PRESETS["tiny"]
    with pytest.raises(ValueError, match="num_heads_q"):
        dataclasses.replace(tiny, num_heads_kv=3)
    with pytest.raises(ValueError, match="mm_layers"):
        dataclasses.replace(tiny, mm_layers=(0, 6))
    with pytest.raises(ValueError, match="local_attn_layers"):
        dataclasses.replace(tiny, local_attn_layers=(2, 1))
    with pytest.raises(ValueError, match="coords_style"):
        dataclasses.replace(tiny, coords_style="v3")
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(tiny, head_dim=12)
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(tiny, hidden_size=0)
