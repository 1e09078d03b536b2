"""Attention: the dense kernels (SDPA, flash-attn, SageAttention, an fp32 reference) behind one signature, and
``StreamAttention``, which runs them over a packed stream: block-diagonal per sample, and the 1080p-SR local
layers as an exact per-frame-window decomposition (never an SxS mask or score matrix).

Kernel signature: ``kernel(q [Sq,Hq,Dh], k [Sk,Hkv,Dh], v [Sk,Hkv,Dh]) -> [Sq,Hq,Dh]``, bf16 in and out,
non-causal, softmax scale 1/sqrt(Dh), grouped-query (query head i reads KV head i // (Hq/Hkv)).
"""

import importlib.util
from collections.abc import Callable

import torch

from .sdpa import SdpaAttention
from .tokens import SampleShape, TokenStream

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

INSTALL_HINTS = {
    "flash": "pip install flash-attn --no-build-isolation",
    "sage": "pip install sageattention",
}


# The default kernel; its backend plans are chosen per device and shape class at first use (see sdpa.py).
sdpa_attention = SdpaAttention()


def fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: the bf16 inputs upcast and attended in fp32, the output rounded once to the input dtype.
    Slow; for parity checks against the official fixtures (made with an fp32-math stand-in)."""
    return sdpa_attention(q.float(), k.float(), v.float()).to(q.dtype)


def _fa3_usable() -> bool:
    # FA3 builds target Hopper; on other GPUs its first call raises (GPU_REVIEW.md C2): sm_90 only.
    return (
        importlib.util.find_spec("flash_attn_interface") is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] == 9
    )


def _flash_kernel() -> AttentionKernel:
    # FA3 (package flash_attn_interface) on Hopper, as the official code does; FA2 everywhere else.
    if _fa3_usable():
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func

    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        # Some FA3 releases return (out, softmax_lse).
        return (out[0] if isinstance(out, tuple) else out)[0]

    return flash_attention


def _sage_kernel() -> AttentionKernel:
    from sageattention import sageattn

    def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), tensor_layout="NHD")[0]

    return sage_attention


def is_available(name: str) -> bool:
    if name == "flash":
        return _fa3_usable() or importlib.util.find_spec("flash_attn") is not None
    if name == "sage":
        return importlib.util.find_spec("sageattention") is not None
    return name in ("sdpa", "fp32")


def make_attention(name: str = "sdpa") -> AttentionKernel:
    """Resolve a kernel once: "sdpa" (default; its backend is chosen per device and shape class, never the
    O(S²) math kernel, see sdpa.py), "flash" (FA3 on sm_90, else FA2), "sage", "fp32" (reference), or
    "auto" (flash-attn when installed and CUDA is present, else SDPA). A chosen but missing backend raises
    ``ImportError`` with the pip line that installs it."""
    if name == "auto":
        name = "flash" if torch.cuda.is_available() and is_available("flash") else "sdpa"
    if name == "sdpa":
        return sdpa_attention
    if name == "fp32":
        return fp32_attention
    if name in INSTALL_HINTS:
        if not is_available(name):
            raise ImportError(
                f"attention backend '{name}' is not installed; install it with: {INSTALL_HINTS[name]}"
            )
        return _flash_kernel() if name == "flash" else _sage_kernel()
    raise ValueError(f"unknown attention backend {name!r}; expected sdpa, flash, sage, fp32 or auto")


def frame_windows(frames: int, receptive_field: int) -> list[tuple[int, int, int, int]]:
    """Local attention of video queries, grouped: (first query frame, end query frame, first key frame, end
    key frame) for each run of consecutive query frames whose key window [f-R, f+R] (clipped) is the same."""
    runs: list[tuple[int, int, int, int]] = []
    for f in range(frames):
        lo, hi = max(0, f - receptive_field), min(frames, f + receptive_field + 1)
        if runs and runs[-1][2:] == (lo, hi):
            runs[-1] = (runs[-1][0], f + 1, lo, hi)
        else:
            runs.append((f, f + 1, lo, hi))
    return runs


class StreamAttention:
    """Attention over one packed stream, built once per forward and shared by every layer.

    Samples never attend to each other. In a local layer, a video query of latent frame f sees the video keys
    of frames f-R..f+R (clipped to the clip) plus all of its sample's audio and text keys; audio and text
    queries see their whole sample. Each query block is one dense kernel call on exactly its visible keys, so
    the result equals dense masked attention with no log-sum-exp merging.
    """

    def __init__(
        self, kernel: AttentionKernel, stream: TokenStream, receptive_field: int, device: torch.device
    ):
        self.kernel = kernel
        self.stream = stream
        self.receptive_field = receptive_field
        # Stream rows of each sample in [video | audio | text] order. A single sample already is in that
        # order (its stream is [video | audio | text]), so it needs no gather at all.
        self.rows = None
        if len(stream.samples) > 1:
            self.rows = [
                torch.cat([torch.arange(p.start, p.stop, device=device) for p in stream.sample_rows(i)])
                for i in range(len(stream.samples))
            ]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: bool) -> torch.Tensor:
        """q [S,Hq,Dh], k/v [S,Hkv,Dh] bf16 in stream order -> [S,Hq,Dh] bf16."""
        if self.rows is None:
            return self.sample(q, k, v, self.stream.samples[0], local)
        out = q.new_empty(q.shape)  # [S, Hq, Dh]
        for rows, shape in zip(self.rows, self.stream.samples, strict=True):
            o = self.sample(
                q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows), shape, local
            )
            out.index_copy_(0, rows, o)
        return out

    def sample(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: SampleShape, local: bool):
        """Attention within one sample whose rows are [video | audio | text]."""
        runs = frame_windows(shape.frames, self.receptive_field) if local else []
        if len(runs) <= 1:  # full layer, or every frame's window is the whole clip: one dense call
            return self.kernel(q, k, v)
        tpf, nv = shape.tokens_per_frame, shape.video
        out = q.new_empty(q.shape)  # [S, Hq, Dh]
        for f0, f1, lo, hi in runs:
            if hi == shape.frames:  # window reaches the last frame: keys lo.. are one contiguous slice
                ks, vs = k[lo * tpf :], v[lo * tpf :]
            else:
                ks = torch.cat([k[lo * tpf : hi * tpf], k[nv:]])  # [window + audio + text, Hkv, Dh]
                vs = torch.cat([v[lo * tpf : hi * tpf], v[nv:]])
            out[f0 * tpf : f1 * tpf] = self.kernel(q[f0 * tpf : f1 * tpf], ks, vs)
        out[nv:] = self.kernel(q[nv:], k, v)
        return out
