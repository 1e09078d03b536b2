"""The MagiHuman single-stream audio-video DiT. The module tree is the checkpoint key tree, so a state dict
loads with one strict ``load_state_dict(sd, strict=True, assign=True)``; block linears and the attention
kernel are injected at construction. Numerics follow the official model: fp32 residual stream, bf16 GEMMs
and attention inputs, fp32 norms, RoPE, gates and activations.

Tokens stay in stream order ([video | audio | text], see ``tokens.py``) from the adapter to the heads. The
official model argsorts tokens by modality before the blocks and un-permutes around attention; with this
packing that permutation is the identity, so it is never applied.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from ...fp8.linear import rows_per_chunk
from .attention import AttentionKernel, StreamAttention, sdpa_attention
from .config import DiTConfig
from .linear import Bf16Linear
from .parallel import SequenceShard, Ulysses
from .rope import FourierEmbed, apply_rope
from .tokens import pack, stream_coords, unpack

Splits = tuple[int, int, int]
Rope = tuple[torch.Tensor, torch.Tensor]


def modality_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, num_experts: int, splits: Splits | None, eps: float, out_dtype
) -> torch.Tensor:
    """RMSNorm of x [S, D] over D in fp32 with weight (1 + w); with 3 experts, rows grouped by ``splits``
    take their modality's chunk of ``weight`` [E·D]. Result in ``out_dtype`` (fp32, or bf16 for a GEMM)."""
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)
    if num_experts == 1:
        return t.mul_(weight + 1).to(out_dtype)
    for rows, chunk in zip(t.split(splits), weight.chunk(num_experts), strict=True):
        rows.mul_(chunk + 1)
    return t.to(out_dtype)


class ModalityRMSNorm(nn.Module):
    """RMSNorm over the last dim in fp32 with weight (1 + w), eps 1e-6; with 3 experts, ``weight`` holds one
    chunk per modality and rows are grouped by ``splits`` along dim 0. ``kernel`` is
    :func:`modality_rms_norm` or its compiled twin (``fusion.fuse``)."""

    def __init__(self, dim: int, num_experts: int = 1, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.eps = num_experts, 1e-6
        self.weight = nn.Parameter(
            torch.empty(num_experts * dim, dtype=torch.float32, device=device), requires_grad=False
        )
        self.kernel = modality_rms_norm

    def forward(self, x: torch.Tensor, splits: Splits | None = None, out_dtype=torch.float32) -> torch.Tensor:
        return self.kernel(x, self.weight, self.num_experts, splits, self.eps, out_dtype)


def gelu7(u: torch.Tensor) -> torch.Tensor:
    """Quick-GELU with an upper clamp: a = min(u, 7); a·sigmoid(1.702a). bf16 in/out, fp32 math."""
    a = u.float().clamp_(max=7.0)
    return a.mul_(torch.sigmoid(a * 1.702)).to(torch.bfloat16)


def swiglu7(u: torch.Tensor) -> torch.Tensor:
    """Clamped SwiGLU on interleaved channels (even = gate, odd = linear): [S, 2I] -> [S, I], bf16 in/out:
    gate = min(u_even, 7), lin = clamp(u_odd, -7, 7); gate·sigmoid(1.702·gate)·(lin + 1)."""
    gate = u[:, 0::2].float().clamp_(max=7.0)
    linear = u[:, 1::2].float().clamp_(-7.0, 7.0)
    return gate.mul_(torch.sigmoid(gate * 1.702)).mul_(linear.add_(1)).to(torch.bfloat16)


def norm_rope(x, weight, num_experts: int, splits: Splits | None, eps: float, sin, cos) -> torch.Tensor:
    """q or k [S, H, Dh]: per-head RMSNorm in fp32 (as :func:`modality_rms_norm`), then RoPE with sin/cos
    [S, n], written in bf16 (the attention input)."""
    return apply_rope(modality_rms_norm(x, weight, num_experts, splits, eps, torch.float32), sin, cos)


def attention_gate(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """o [S, Hq, Dh] bf16 times the per-token, per-head gate sigmoid(g [S, Hq]) in fp32 -> [S, Hq·Dh] bf16."""
    return (o * torch.sigmoid(g.float()).unsqueeze(-1)).reshape(o.shape[0], -1).to(torch.bfloat16)


class Attention(nn.Module):
    def __init__(self, config: DiTConfig, layer: int, linear_cls: Callable, device):
        super().__init__()
        e, d, dh = config.num_experts(layer), config.hidden_size, config.head_dim
        self.heads_q, self.heads_kv, self.head_dim = config.num_heads_q, config.num_heads_kv, dh
        self.gate_channels = config.gate_channels
        self.local = config.is_local(layer)
        self.per_modality = e > 1
        self.pre_norm = ModalityRMSNorm(d, e, device)
        self.linear_qkv = linear_cls(d, config.qkv_width, num_experts=e, device=device)
        self.linear_proj = linear_cls(self.heads_q * dh, d, num_experts=e, device=device)
        self.q_norm = ModalityRMSNorm(dh, e, device)
        self.k_norm = ModalityRMSNorm(dh, e, device)
        self.norm_rope, self.gate = norm_rope, attention_gate  # or compiled twins (fusion.fuse)

    def forward(self, x: torch.Tensor, rope: Rope, splits: Splits, attend: StreamAttention) -> torch.Tensor:
        """x [S, D] fp32 -> attention output [S, D] bf16 (added to the residual by the caller)."""
        s, dh = x.shape[0], self.head_dim
        splits = splits if self.per_modality else None  # the linear contract: None for one expert
        h = self.pre_norm(x, splits, torch.bfloat16)  # [S, D]
        qkv = self.linear_qkv(h, splits)  # [S, (Hq + 2Hkv)·Dh + G] bf16
        del h  # its memory serves q and k
        q, k, v, g = qkv.split(
            [self.heads_q * dh, self.heads_kv * dh, self.heads_kv * dh, self.gate_channels], 1
        )
        q = self._norm_rope(q.view(s, self.heads_q, dh), self.q_norm, splits, rope)  # [S, Hq, Dh] bf16
        k = self._norm_rope(k.view(s, self.heads_kv, dh), self.k_norm, splits, rope)  # [S, Hkv, Dh] bf16
        o = attend(q, k, v.view(s, self.heads_kv, dh), self.local)  # [S, Hq, Dh] bf16
        del q, k  # dead: their memory serves the gate and linear_proj
        o = self._gate(o, g) if self.gate_channels else o.reshape(s, self.heads_q * dh)  # [S, Hq·Dh] bf16
        return self.linear_proj(o, splits)  # [S, D]

    def _gate(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """o [S, Hq, Dh] gated by g [S, Hq] -> [S, Hq·Dh] bf16, in row chunks on long streams (the gate's
        fp32 product of a whole 1080p-SR stream would be 1.3 GB)."""
        step = rows_per_chunk(o.shape[1] * o.shape[2])
        if o.shape[0] <= step:
            return self.gate(o, g)
        out = o.new_empty(o.shape[0], o.shape[1] * o.shape[2])  # [S, Hq·Dh]
        for rows in range(0, o.shape[0], step):
            out[rows : rows + step] = self.gate(o[rows : rows + step], g[rows : rows + step])
        return out

    def _norm_rope(self, t: torch.Tensor, norm: ModalityRMSNorm, splits: Splits | None, rope: Rope):
        """q or k [S, H, Dh] -> normalised and rotated, bf16. Long streams go in row chunks within one
        modality each, so the fp32 temporaries are a chunk's (at 1080p SR a whole fp32 q is 1.3 GB)."""
        step, eps = rows_per_chunk(t.shape[1] * t.shape[2]), norm.eps
        if t.shape[0] <= step:
            return self.norm_rope(t, norm.weight, norm.num_experts, splits, eps, *rope)
        out = torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)  # [S, H, Dh]
        start = 0
        for count, weight in zip(splits or (t.shape[0],), norm.weight.chunk(norm.num_experts), strict=True):
            for rows in range(start, start + count, step):
                chunk = slice(rows, min(rows + step, start + count))
                sin, cos = (r[chunk] for r in rope)
                out[chunk] = self.norm_rope(t[chunk], weight, 1, None, eps, sin, cos)
            start += count
        return out


class MLP(nn.Module):
    def __init__(self, config: DiTConfig, layer: int, linear_cls: Callable, device):
        super().__init__()
        e, d, inter = config.num_experts(layer), config.hidden_size, config.intermediate(layer)
        self.per_modality = e > 1
        self.activation = gelu7 if config.is_gelu7(layer) else swiglu7
        self.pre_norm = ModalityRMSNorm(d, e, device)
        self.up_gate_proj = linear_cls(
            d, inter if config.is_gelu7(layer) else 2 * inter, num_experts=e, device=device
        )
        self.down_proj = linear_cls(inter, d, num_experts=e, device=device)

    def forward(self, x: torch.Tensor, splits: Splits) -> torch.Tensor:
        """x [S, D] fp32 -> MLP output [S, D] bf16."""
        splits = splits if self.per_modality else None
        h = self.pre_norm(x, splits, torch.bfloat16)  # [S, D]
        if h.shape[0] <= rows_per_chunk(self.up_gate_proj.out_features):
            a = self.activation(self.up_gate_proj(h, splits))  # one GEMM: [S, up] -> [S, I] bf16
        else:  # activated row chunk by row chunk: the [S, up] output (3.6 GB at 1080p SR) never exists whole
            a = self.up_gate_proj(h, splits, epilogue=self.activation)  # [S, I] bf16
        del h
        return self.down_proj(a, splits)


class TransformerLayer(nn.Module):
    def __init__(self, config: DiTConfig, layer: int, linear_cls: Callable, device):
        super().__init__()
        self.attention = Attention(config, layer, linear_cls, device)
        self.mlp = MLP(config, layer, linear_cls, device)

    def forward(self, x: torch.Tensor, rope: Rope, splits: Splits, attend: StreamAttention) -> torch.Tensor:
        """Pre-norm residual layer. Updates the fp32 residual x [S, D] in place and returns it."""
        x += self.attention(x, rope, splits, attend)
        x += self.mlp(x, splits)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig, linear_cls: Callable, device):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(config, i, linear_cls, device) for i in range(config.num_layers)
        )

    def forward(self, x: torch.Tensor, rope: Rope, splits: Splits, attend: StreamAttention) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, rope, splits, attend)
        return x


class Adapter(nn.Module):
    """fp32 input projections of each modality, and the RoPE bands."""

    def __init__(self, config: DiTConfig, device):
        super().__init__()
        d = config.hidden_size
        self.video_embedder = skip_init(
            nn.Linear, config.video_in_channels, d, device=device, dtype=torch.float32
        )
        self.text_embedder = skip_init(
            nn.Linear, config.text_in_channels, d, device=device, dtype=torch.float32
        )
        self.audio_embedder = skip_init(
            nn.Linear, config.audio_in_channels, d, device=device, dtype=torch.float32
        )
        self.rope = FourierEmbed(config.head_dim, device)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """fp32 token blocks -> residual stream [S, D] fp32 in stream order."""
        return torch.cat([self.video_embedder(video), self.audio_embedder(audio), self.text_embedder(text)])


class MagiDiT(nn.Module):
    """``dit(video [1,48,F,h,w], audio [1,A,64], text [1,L,3584]) -> (video velocity, audio velocity)``.

    ``linear_cls(in_features, out_features, num_experts=, device=)`` builds the 4 block linears per layer
    (``Bf16Linear`` or a partial of ``Fp8Linear``); ``attention`` is a kernel from
    :func:`~.attention.make_attention`. Parameters are uninitialised placeholders until a state dict is
    loaded: build on ``device="meta"``, then ``load_state_dict(sd, strict=True, assign=True)``.
    """

    def __init__(
        self,
        config: DiTConfig,
        linear_cls: Callable = Bf16Linear,
        attention: AttentionKernel = sdpa_attention,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.config, self.attention = config, attention
        d = config.hidden_size
        self.adapter = Adapter(config, device)
        self.block = TransformerBlock(config, linear_cls, device)
        self.final_norm_video = ModalityRMSNorm(d, 1, device)
        self.final_norm_audio = ModalityRMSNorm(d, 1, device)
        self.final_linear_video = skip_init(
            nn.Linear, d, config.video_in_channels, bias=False, device=device, dtype=torch.float32
        )
        self.final_linear_audio = skip_init(
            nn.Linear, d, config.audio_in_channels, bias=False, device=device, dtype=torch.float32
        )
        self.requires_grad_(False)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: video [1,C,F,h,w], audio [1,A,64], text [1,L,3584] (fp32 or fp16; L = real length)
        -> (video velocity [1,C,F,h,w], audio velocity [1,A,64]), fp32."""
        return self.forward_many([(video, audio, text)])[0]

    def forward_many(
        self,
        samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        parallel: Ulysses | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several samples (e.g. CFG cond and uncond, whose text lengths differ) as one packed stream: the
        linears see all tokens at once, attention stays within each sample. Equals separate ``forward``
        calls. ``parallel``: this rank's place in a sequence-parallel group (see ``parallel.py``; every
        rank passes the same samples and gets the whole result); None runs the whole stream here."""
        c = self.config
        device = self.final_linear_video.weight.device
        stream, video, audio, text = pack(
            samples, (c.latent_channels, c.audio_in_channels, c.text_in_channels)
        )
        video, audio, text = (t.to(device) for t in (video, audio, text))
        rope = self.adapter.rope(stream_coords(stream, c.coords_style, device))  # 2 x [S, 3·Dh/8]
        x = self.adapter(video, audio, text)  # [S, D] fp32
        attend = StreamAttention(self.attention, stream, c.frame_receptive_field, device)
        splits, shard = stream.splits, None
        if parallel is not None:  # this rank's rows s_r of the stream; attention sees whole samples
            shard = SequenceShard(parallel, stream)
            # A copy, so the whole stream's residual [S, D] is freed: each rank keeps only its rows.
            x, rope, splits = shard.slice(x).clone(), tuple(shard.slice(r) for r in rope), shard.splits
            attend = shard.attention(attend)
        x = self.block(x, rope, splits, attend)
        nv, na, _ = splits
        video_out = self.final_linear_video(self.final_norm_video(x[:nv]))  # [Σv, 4C]
        audio_out = self.final_linear_audio(self.final_norm_audio(x[nv : nv + na]))  # [Σa, 64]
        if shard is not None:
            video_out, audio_out = shard.gather(video_out, audio_out, stream.splits)
        return unpack(video_out, audio_out, stream)
