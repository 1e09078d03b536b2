"""Our models under ComfyUI's memory management. The DiT (14-30 GB) is registered with ComfyUI through a
ModelPatcher, so ComfyUI makes room for it, offloads it when another model needs the GPU and releases it on
"unload models". Encoders and decoders, used for seconds per run, visit the GPU only while they work."""

from contextlib import contextmanager

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from torch import nn


def module_bytes(module: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of parameters and buffers (those on ``device`` only, when given)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.nbytes for t in tensors if device is None or t.device == device)


class Managed:
    """A model the nodes share, registered with ComfyUI; ``use()`` returns it on the compute device."""

    def __init__(self, model: nn.Module, resident_bytes: int | None = None):
        self.model = model
        self.patcher = ModelPatcher(
            model,
            load_device=mm.get_torch_device(),
            offload_device=mm.unet_offload_device(),
            size=resident_bytes if resident_bytes is not None else module_bytes(model),
        )

    def use(self) -> nn.Module:
        mm.load_models_gpu([self.patcher])
        return self.model


@contextmanager
def on_device(model, nbytes: int):
    """Bring a briefly used model (text encoder, VAE) to the compute device, making room for it first
    (ComfyUI offloads other models, ours included), and send it back to system memory afterwards."""
    device = mm.get_torch_device()
    mm.free_memory(nbytes, device)
    model.to(device)
    try:
        yield model
    finally:
        model.to(mm.unet_offload_device())
        mm.soft_empty_cache()
