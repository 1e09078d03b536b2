"""Several processes on one DiT forward, over torch.distributed (NCCL on GPUs, gloo on CPUs).

Ulysses sequence parallelism: every rank holds a full replica of the weights and the same inputs; it runs
the linears, norms and MLPs on its own contiguous slice of the packed stream (rank r: rows
``shard_rows(S, W)[r]``, which keeps stream order, so a slice's per-modality split is its own
(video, audio, text) row counts). Around attention one all-to-all turns "my rows, all heads" into "all rows,
my heads" and a second one turns the output back, so the attention kernel (dense, 1080p local windows,
several CFG samples kept apart) sees whole samples with Hq/W query heads and runs unchanged.

CFG parallelism: with as many ranks as guidance branches, each rank runs one whole branch and the
velocities are exchanged (one broadcast per branch); no activation crosses ranks inside the model.

World size 1 never builds any of this: the model's single-process path is today's code.
"""

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .tokens import TokenStream

Splits = tuple[int, int, int]


def shard_rows(total: int, world: int) -> list[int]:
    """Rows per rank of an S-row stream: contiguous, as even as possible (the first S mod W get one more)."""
    return [total // world + (r < total % world) for r in range(world)]


def local_splits(splits: Splits, start: int, stop: int) -> Splits:
    """The (video, audio, text) row counts of stream rows [start, stop); the stream is [video|audio|text]."""
    bounds = (0, splits[0], splits[0] + splits[1], sum(splits))
    return tuple(
        max(0, min(stop, hi) - max(start, lo)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    )  # type: ignore


@dataclass
class Ulysses:
    """One process's place in a sequence-parallel group (``group`` None = the default group). Counts the
    bytes this rank sends to other ranks (``bytes_sent``), for the benchmark."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None
    bytes_sent: int = field(default=0, compare=False)

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> "Ulysses":
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def check_heads(self, heads_q: int, heads_kv: int) -> None:
        if heads_q % self.world or (heads_kv % self.world and self.world % heads_kv):
            raise ValueError(
                f"sequence parallelism over {self.world} processes needs the {heads_q} query heads divisible "
                f"by {self.world} and the {heads_kv} KV heads a multiple or divisor of {self.world}; "
                "use 1, 2, 4 or 8 GPUs for MagiHuman (40 query / 8 KV heads)"
            )

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows ``send[j]`` of x (in order) go to rank j; returns the rows received, in rank order."""
        out = x.new_empty((sum(recv), *x.shape[1:]))
        # As bytes (split sizes count dim-0 rows, so they stay): gloo's all-to-all takes no bf16.
        dist.all_to_all_single(
            out.view(torch.uint8), x.contiguous().view(torch.uint8), recv, send, group=self.group
        )
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.bytes_sent += row * (sum(send) - send[self.rank])
        return out

    def to_heads(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """[s_r, H, Dh] (my rows, all heads) -> [S, H/W, Dh] (all rows, my heads)."""
        s, h, dh = x.shape
        w = self.world
        chunks = x.view(s, w, h // w, dh).transpose(0, 1).reshape(w * s, h // w, dh)  # [W·s_r, H/W, Dh]
        return self.all_to_all(chunks, [s] * w, rows)

    def to_rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """[S, H/W, Dh] (all rows, my heads) -> [s_r, H, Dh] (my rows, all heads)."""
        w, s = self.world, rows[self.rank]
        _, hw, dh = x.shape
        back = self.all_to_all(x, rows, [s] * w)  # [W·s_r, H/W, Dh], head blocks in rank order
        return back.view(w, s, hw, dh).transpose(0, 1).reshape(s, w * hw, dh)

    def gather_rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Every rank's [rows[r], C] -> the whole [Σ rows, C] on every rank (padded to the largest slice)."""
        most = max(rows)
        padded = x.new_zeros(most, x.shape[1])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        self.bytes_sent += padded.numel() * padded.element_size() * (self.world - 1)
        return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])


class SequenceShard:
    """This rank's part of one forward over ``stream``: the row range, its expert splits, and the attention
    wrapper; built once per forward by the model."""

    def __init__(self, ulysses: Ulysses, stream: TokenStream):
        self.ulysses = ulysses
        self.rows = shard_rows(stream.total, ulysses.world)
        self.start = sum(self.rows[: ulysses.rank])
        self.stop = self.start + self.rows[ulysses.rank]
        self.splits = local_splits(stream.splits, self.start, self.stop)

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.start : self.stop]

    def attention(self, attend):
        """Wrap ``attend(q, k, v, local)`` (whole-stream attention) for sharded rows."""
        ulysses, rows = self.ulysses, self.rows

        def sharded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: bool) -> torch.Tensor:
            # q [s_r, Hq, Dh], k/v [s_r, Hkv, Dh]. With fewer KV heads than ranks, each KV head is repeated so
            # rank r gets the one its query heads Hq/W·r .. read (query head i reads KV head i // (Hq/Hkv)).
            repeat = max(1, ulysses.world // k.shape[1])
            if repeat > 1:
                k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
            o = attend(ulysses.to_heads(q, rows), ulysses.to_heads(k, rows), ulysses.to_heads(v, rows), local)
            return ulysses.to_rows(o, rows)  # [s_r, Hq, Dh]

        return sharded

    def gather(self, video_out: torch.Tensor, audio_out: torch.Tensor, splits: Splits):
        """This rank's head outputs (its video rows, its audio rows) -> the whole stream's, on every rank."""
        bounds = [0, *itertools.accumulate(self.rows)]
        parts = [local_splits(splits, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        video = self.ulysses.gather_rows(video_out, [p[0] for p in parts])  # [Σv, 4C]
        return video, self.ulysses.gather_rows(audio_out, [p[1] for p in parts])  # [Σa, 64]


class ParallelDiT:
    """A DiT run by every rank of a group, called exactly like the model (``dit(video, audio, text)``,
    ``dit.forward_many(samples)``) with the same inputs on every rank; every rank gets the whole result.

    ``cfg``: when a call has exactly W samples (the guidance branches, world 2), rank i runs sample i alone
    and the outputs are broadcast; any other call is split along the sequence."""

    def __init__(self, dit, ulysses: Ulysses, cfg: bool = False):
        ulysses.check_heads(dit.config.num_heads_q, dit.config.num_heads_kv)
        self.dit, self.ulysses, self.cfg = dit, ulysses, cfg

    def __call__(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor):
        return self.forward_many([(video, audio, text)])[0]

    def forward_many(self, samples):
        if not (self.cfg and len(samples) == self.ulysses.world):
            return self.dit.forward_many(samples, parallel=self.ulysses)
        u = self.ulysses
        mine = self.dit.forward_many([samples[u.rank]])[0]
        outputs = []
        for i, (video, audio, _) in enumerate(samples):
            # Velocities have their latents' shapes, so every rank knows what it receives.
            empty = (
                video.new_empty(video.shape, dtype=torch.float32),
                audio.new_empty(audio.shape, dtype=torch.float32),
            )
            got = tuple(t.contiguous() for t in (mine if i == u.rank else empty))
            for t in got:
                dist.broadcast(t, dist.get_global_rank(u.group, i) if u.group else i, group=u.group)
                if i == u.rank:
                    u.bytes_sent += t.numel() * t.element_size() * (u.world - 1)
            outputs.append(got)
        return outputs


@dataclass(frozen=True)
class ParallelPlan:
    """How the processes of a group share a stage (a field of the stage request; every rank runs the stage
    with the same request). ``group`` None = the default group; ``cfg``: guidance branches on separate ranks
    (the base model's guided steps with 2 ranks) instead of splitting the sequence."""

    group: dist.ProcessGroup | None = None
    cfg: bool = False

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def wrap(self, dit) -> "ParallelDiT":
        return ParallelDiT(dit, Ulysses.of(self.group), self.cfg)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a group of local processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(device: torch.device, timeout_s: float = 300.0) -> ParallelPlan | None:
    """Join the group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL on CUDA,
    gloo on the CPU. None when there is one process. A rank that stops answering ends the others' collectives
    with an error after ``timeout_s`` instead of a hang."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ParallelPlan()
