"""Counting the bytes of live tensor storage while code runs: on real tensors (a CPU measurement), or on fake
tensors, where nothing is allocated and the count is a device-free prediction of a device's peak memory.

Every new storage an operator produces is registered once with a weak reference whose callback subtracts its
size when the storage is freed, so views and in-place results cost nothing and frees are seen as they
happen. Storages made outside torch's dispatcher (a safetensors memory map) are not counted: they are file
pages, not allocations.
"""

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as counter:`` ... then ``counter.peak`` / ``counter.live`` in bytes (per device
    type when ``device`` is None: ``counter.live_on("cpu")``). ``reset_peak()`` starts a new peak from what is
    live now; ``track(tensor)`` counts a tensor made before the counter started (e.g. model weights)."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, in-place and out= results share an input's storage: no new memory (and an input made before
        # the counter started, e.g. a meta placeholder, must not be counted by taking a view of it).
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                self.track(tensor)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        if self.device is not None and tensor.device.type != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        nbytes = storage.nbytes()

        def freed(_, key=key, nbytes=nbytes):
            self.live -= nbytes
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.peak = self.live


class FakeLiveBytes:
    """Fake tensors (``FakeTensorMode``) with a :class:`LiveBytes` counter on top: tensors made inside have
    shapes, dtypes and devices but no memory, and the counter sees what a real run would hold."""

    def __init__(self):
        self.fake = FakeTensorMode(allow_non_fake_inputs=False)
        self.counter = LiveBytes()

    def __enter__(self) -> LiveBytes:
        self.fake.__enter__()
        self.counter.__enter__()
        return self.counter

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        self.fake.__exit__(*exc)
