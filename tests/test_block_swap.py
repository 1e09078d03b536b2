"""Block swap keeps layers off the compute device between calls and changes nothing in the results."""

import pytest
import torch
from conftest import FIXTURES
from magihuman.pipeline.dit.block_swap import BlockSwap
from magihuman.pipeline.dit.loading import load_dit
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def sample():
    golden = load_file(FIXTURES / "dit_tiny_v2" / "tensors.safetensors")
    return golden["input.video_latent"], golden["input.audio_latent"], golden["input.text_embedding"]


@pytest.mark.parametrize(
    "path, compute",
    [(FIXTURES / "dit_tiny_weights", "auto"), (FIXTURES / "dit_tiny_fp8" / "checkpoint", "dequantize")],
)
@pytest.mark.parametrize("count", [1, 3, 6])
def test_outputs_do_not_change(sample, path, compute, count):
    model, _ = load_dit(path, "base", compute=compute)
    reference = model(*sample)
    stored = {
        name: tensor for name, tensor in model.state_dict().items() if name.startswith("block.layers.5.")
    }
    swap = BlockSwap(model, count, device="cpu")
    swapped = model(*sample)
    for a, b in zip(reference, swapped, strict=True):
        assert torch.equal(a, b)
    # Between calls the swapped layers hold their offloaded tensors again, not the per-call copies.
    for name, tensor in model.state_dict().items():
        if name in stored:
            assert torch.equal(tensor, stored[name])
    owners = [entry[:2] for entry in swap.stored[-1]]
    assert all(
        getattr(owner, name).data_ptr() == entry[3].data_ptr()
        for (owner, name), entry in zip(owners, swap.stored[-1], strict=True)
    )
    assert not swap.ready  # no copy is left behind
    swap.remove()
    again = model(*sample)
    assert torch.equal(again[0], reference[0])


def test_loader_places_swapped_layers_in_cpu_memory_directly(sample):
    reference = load_dit(FIXTURES / "dit_tiny_weights", "base")[0](*sample)
    model, _ = load_dit(FIXTURES / "dit_tiny_weights", "base", swap_layers=2)
    assert len(model.block_swap.layers) == 2 and model.block_swap.layers[0] is model.block.layers[4]
    for a, b in zip(reference, model(*sample), strict=True):
        assert torch.equal(a, b)


def test_resident_part_is_everything_but_the_swapped_layers():
    model, _ = load_dit(FIXTURES / "dit_tiny_weights", "base", swap_layers=2)

    def tensors(*modules):
        return {id(t) for module in modules for t in [*module.parameters(), *module.buffers()]}

    resident = tensors(model.block_swap.resident(model))
    swapped = tensors(*model.block_swap.layers)
    assert resident | swapped == tensors(model) and not resident & swapped


def test_count_is_checked():
    model, _ = load_dit(FIXTURES / "dit_tiny_weights", "base")
    for count in (0, 7):
        with pytest.raises(ValueError, match="from 1 to 6 layers"):
            BlockSwap(model, count, device="cpu")


@pytest.mark.gpu
def test_gpu_swap_matches_resident_model(sample):
    resident, _ = load_dit(FIXTURES / "dit_tiny_fp8" / "checkpoint", "base", device="cuda")
    swapped, _ = load_dit(FIXTURES / "dit_tiny_fp8" / "checkpoint", "base", device="cuda")
    BlockSwap(swapped, 4, device="cuda")
    inputs = [t.cuda() for t in sample]
    for a, b in zip(resident(*inputs), swapped(*inputs), strict=True):
        assert torch.equal(a, b)
    assert swapped.block.layers[5].mlp.down_proj.weight_padded.device.type == "cpu"


def test_each_swapped_layer_lives_in_one_buffer():
    model, _ = load_dit(FIXTURES / "dit_tiny_fp8" / "checkpoint", "base", compute="dequantize")
    swap = BlockSwap(model, 2, device="cpu")
    for layer, buffer in zip(swap.layers, swap.buffers, strict=True):
        tensors = [*layer.parameters(), *layer.buffers()]
        assert {t.untyped_storage().data_ptr() for t in tensors} == {buffer.untyped_storage().data_ptr()}
        assert buffer.nbytes <= sum(t.nbytes for t in tensors) + 64 * len(tensors)
