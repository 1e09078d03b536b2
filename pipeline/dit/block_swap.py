"""Block swap: keep the weights of some DiT layers in CPU memory and bring each one to the compute device just
before it runs, the next one copying on a side stream while the current one computes. For GPUs that cannot
hold the whole 14.3 GiB FP8 DiT next to its activations; results are identical, only slower."""

import weakref

import torch
from torch import nn

from ...fp8.linear import Fp8Linear


def _tensors(module: nn.Module):
    """(owner module, name, is_parameter) of every parameter and buffer tensor under ``module``."""
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, True
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, False


def _set(owner: nn.Module, name: str, is_parameter: bool, tensor: torch.Tensor) -> None:
    if is_parameter:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


ALIGN_BYTES = 64


def _flat_copy(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One uint8 buffer on ``device`` holding copies of ``tensors`` (each at a 64-byte aligned offset), and
    the views of it in the tensors' dtypes and shapes."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    views = []
    for tensor, offset in zip(tensors, offsets, strict=True):
        view = flat[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        views.append(view.copy_(tensor))
    return flat, views


def _pin(flat: torch.Tensor) -> None:
    """Page-lock a layer's buffer for asynchronous copies. cudaHostRegister pins exactly its bytes; torch's
    pin_memory() rounds every allocation up to a power of two (a 273 MB layer would pin 512 MB)."""
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(flat.data_ptr(), flat.nbytes, 0)
    if int(getattr(status, "value", status)) != 0:
        raise RuntimeError(f"block swap: cudaHostRegister of {flat.nbytes} bytes failed ({status})")
    weakref.finalize(flat, cudart.cudaHostUnregister, flat.data_ptr())


class BlockSwap:
    """Swap the last ``count`` transformer layers of ``model`` (a MagiDiT) between ``offload_device`` and
    ``device``. Built after loading; ``remove()`` restores plain modules (with the weights offloaded)."""

    def __init__(self, model: nn.Module, count: int, device: torch.device | str, offload_device="cpu"):
        layers = model.block.layers
        if not 0 < count <= len(layers):
            raise ValueError(f"block swap count must be from 1 to {len(layers)} layers, got {count}")
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.layers = list(layers)[len(layers) - count :]
        pin = self.device.type == "cuda" and self.offload_device.type == "cpu"
        self.stored = []  # per swapped layer: [(owner, name, is_parameter, offloaded tensor)]
        self.buffers = []  # per swapped layer: one flat buffer that all its offloaded tensors view
        for layer in self.layers:
            entries = list(_tensors(layer))
            flat, views = _flat_copy(
                [getattr(owner, name) for owner, name, _ in entries], self.offload_device
            )
            if pin:
                _pin(flat)
            self.buffers.append(flat)
            self.stored.append([(*entry, view) for entry, view in zip(entries, views, strict=True)])
            for (owner, name, is_parameter), view in zip(entries, views, strict=True):
                _set(owner, name, is_parameter, view)
            for module in layer.modules():
                if isinstance(module, Fp8Linear):
                    module.compute_on(self.device)  # its matmul path is the compute device's, not the CPU's
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.finished: dict[int, torch.cuda.Event] = {}  # compute-stream events after each swapped layer
        self.hooks = []
        for index, layer in enumerate(self.layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda m, a, i=index: self._bring(i)))
            self.hooks.append(layer.register_forward_hook(lambda m, a, o, i=index: self._release(i)))
        # The first swapped layer starts copying when the forward starts (prepend: before its own hook).
        first = model.block.layers[0].register_forward_pre_hook(lambda m, a: self._prefetch(0), prepend=True)
        self.hooks.append(first)

    def _prefetch(self, index: int) -> None:
        """Start copying swapped layer ``index`` to the device (on the side stream when there is one)."""
        if index >= len(self.layers) or index in self.ready:
            return
        if self.stream is None:
            copies = [tensor.to(self.device, copy=True) for *_, tensor in self.stored[index]]
            self.ready[index] = (copies, None)
            return
        # Bounded run-ahead: the copies of layer i need the memory of layer i-2's copies, which the allocator
        # hands back only once the compute stream has finished layer i-2. Waiting for that on the host keeps
        # at most two swapped layers on the device instead of letting the host queue prefetches without end.
        done = self.finished.pop(index - 2, None)
        if done is not None:
            done.synchronize()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = [tensor.to(self.device, non_blocking=True) for *_, tensor in self.stored[index]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[index] = (copies, event)

    def _bring(self, index: int) -> None:
        self._prefetch(index)
        copies, event = self.ready.pop(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for copy in copies:  # the copies were made on the side stream: tell the allocator who uses them
                copy.record_stream(torch.cuda.current_stream(self.device))
        for (owner, name, is_parameter, _), copy in zip(self.stored[index], copies, strict=True):
            _set(owner, name, is_parameter, copy)
        self._prefetch(index + 1)

    def _release(self, index: int) -> None:
        for owner, name, is_parameter, tensor in self.stored[index]:
            _set(owner, name, is_parameter, tensor)
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.finished[index] = event

    def resident(self, model: nn.Module) -> nn.ModuleList:
        """The parts of ``model`` outside the swapped layers, for a host that moves models between devices
        itself (ComfyUI): moving the whole model would bring the swapped layers to the device too."""
        swapped = {id(layer) for layer in self.layers}

        def outside(module: nn.Module) -> list[nn.Module]:
            if id(module) in swapped:
                return []
            if not any(id(m) in swapped for m in module.modules()):
                return [module]
            return [part for child in module.children() for part in outside(child)]

        return nn.ModuleList(outside(model))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.ready.clear()
        self.finished.clear()
