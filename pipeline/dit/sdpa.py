"""PyTorch SDPA with its backend chosen once per device and shape class, so that no configuration silently
runs the O(S²) math kernel at real sizes.

Why: with grouped-query attention (Hq != Hkv) SDPA only takes its flash kernel (and cuDNN where new
enough); the memory-efficient kernel rejects unequal head counts. Where flash is missing (every Windows
wheel, sm_100/120 before torch 2.7) SDPA quietly falls back to math: 2.6 GB of scores per call at 256p, out
of memory at 540p and 1080p (GPU_REVIEW.md O3). So the first call of a shape class asks torch which fused
kernels accept the real tensors, picks one (expanding K/V heads where that is what makes a kernel usable),
logs the choice and runs every later call of that class under exactly that kernel. If no fused kernel
takes them, queries run in chunks whose score matrix stays bounded: O(S) memory, never S x S.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

FLASH, EFFICIENT, CUDNN, CHUNKED = "flash", "efficient", "cudnn", "chunked"
_BACKENDS = {
    FLASH: SDPBackend.FLASH_ATTENTION,
    EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
    CUDNN: SDPBackend.CUDNN_ATTENTION,
}
# Preference order: (kernel, expand K/V to Hq heads). Flash does GQA natively; memory-efficient needs equal
# head counts (the expanded K/V cost Hq/Hkv x their size, ~1.3 GB at 1080p); cuDNN last, as in SDPA's own
# default order, because its attention has had version-specific numerics problems.
CANDIDATES = ((FLASH, False), (EFFICIENT, True), (CUDNN, False), (CUDNN, True))
# Chunked fallback: query rows per call so that one chunk's fp32 scores hold at most this many elements
# (0.5 GiB; the math kernel keeps about two such buffers).
CHUNK_SCORES = 1 << 27

Probe = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, bool], bool]


def sdpa_usable(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> bool:
    """Whether SDPA's fused ``backend`` accepts q [1,Hq,S,D], k/v [1,Hkv,S,D] as they are (device, dtype,
    strides, head counts), honouring ``torch.backends.cuda.enable_*_sdp``. CPU builds have one fused
    kernel (flash, with GQA)."""
    if q.device.type == "cuda":
        check = getattr(torch.backends.cuda, f"can_use_{backend}_attention", None)
        if check is None:  # e.g. can_use_cudnn_attention is missing from older torch
            return False
        return bool(check(torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, gqa), False))
    if backend != FLASH:
        return False
    try:
        choice = torch._fused_sdp_choice(q, k, v, enable_gqa=gqa)
    except (TypeError, RuntimeError):  # a build whose private chooser lacks enable_gqa: trust the flag
        return torch.backends.cuda.flash_sdp_enabled()
    return choice == SDPBackend.FLASH_ATTENTION.value


@dataclass(frozen=True)
class SdpaPlan:
    """How one shape class runs: ``backend`` (flash, efficient, cudnn or chunked) and whether K/V heads are
    repeated to Hq before the call."""

    backend: str
    expand_kv: bool


def choose_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, usable: Probe = sdpa_usable) -> SdpaPlan:
    """The first candidate whose kernel accepts these [1,H,S,D] tensors; ``chunked`` when none does."""
    grouped = q.shape[1] != k.shape[1]
    for backend, expand in CANDIDATES:
        expand = expand and grouped  # equal head counts: the native call already is the expanded one
        if expand:
            ke, ve = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            if usable(backend, q, ke, ve, False):
                return SdpaPlan(backend, True)
        elif usable(backend, q, k, v, grouped):
            return SdpaPlan(backend, False)
    return SdpaPlan(CHUNKED, grouped)


def _shape_class(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What the kernels' checks depend on (not S): device, dtype, head counts and size, stride and pointer
    alignment (v is a row-strided view of the qkv output; local windows are contiguous copies)."""

    def layout(t: torch.Tensor) -> tuple:
        # Allocations are at least 64-byte aligned, so the view's offset decides the pointer's alignment
        # (and fake tensors, as in the memory model, have no pointer to read).
        aligned = t.storage_offset() * t.element_size() % 16 == 0
        return t.stride(-1) == 1, all(s % 8 == 0 for s in t.stride()[:-1]), aligned

    return (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1], layout(q), layout(k), layout(v))


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention over query chunks (each row's softmax sees every key); q, k, v [1,H,S,D], equal H."""
    rows = max(1, CHUNK_SCORES // (q.shape[1] * k.shape[2]))
    out = torch.empty_like(q)  # [1, Hq, Sq, D]
    for start in range(0, q.shape[2], rows):
        out[:, :, start : start + rows] = F.scaled_dot_product_attention(q[:, :, start : start + rows], k, v)
    return out


class SdpaAttention:
    """The ``sdpa`` kernel: ``kernel(q [Sq,Hq,Dh], k [Sk,Hkv,Dh], v [Sk,Hkv,Dh]) -> [Sq,Hq,Dh]``.

    The plan of each shape class is chosen at its first call and kept (``plans``); ``usable`` is the probe
    (tests force backend availability through it)."""

    def __init__(self, usable: Probe = sdpa_usable):
        self.usable = usable
        self.plans: dict[tuple, SdpaPlan] = {}

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> SdpaPlan:
        """The plan for [1,H,S,D] tensors of this shape class, chosen (and logged) once."""
        key = _shape_class(q, k, v)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = choose_plan(q, k, v, self.usable)
            what = f"{plan.backend}{' with K/V heads expanded' if plan.expand_kv else ''}"
            shape = f"{q.dtype}, {q.shape[1]} query / {k.shape[1]} KV heads of {q.shape[-1]}"
            if plan.backend == CHUNKED and q.device.type == "cuda":
                log.warning(
                    "attention on %s (%s): no fused SDPA kernel accepts these inputs; running exact "
                    "query-chunked attention (bounded memory, slower). Install a torch build with flash "
                    "attention or the flash-attn package for speed.",
                    q.device,
                    shape,
                )
            else:
                log.info("attention on %s (%s): SDPA %s", q.device, shape, what)
        return plan

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, S, Dh]
        plan = self.plan(q, k, v)
        if plan.expand_kv:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # [1, Hq, S, Dh]
        if plan.backend == CHUNKED:
            out = _chunked(q, k, v)
        elif q.device.type == "cuda":
            # Only the chosen kernel is allowed: a mismatch raises instead of silently running math.
            with sdpa_kernel([_BACKENDS[plan.backend]]):
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        else:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)
