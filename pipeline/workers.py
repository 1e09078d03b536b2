"""Several devices from one long-lived process (ComfyUI): the calling process is rank 0 and a pool of
persistent worker processes, each holding its own replica of the same DiT on its own device, are ranks 1..N-1.

Why subprocesses and not ``multiprocessing`` spawn: spawn re-runs the parent's ``__main__`` in every child,
and ComfyUI's main.py parses arguments, runs prestartup scripts and imports every model at module level. A
worker is ``python -c BOOT`` instead: it registers this package under the parent's own package name (so
pickled requests resolve to the same classes) without running the package ``__init__`` (which imports
ComfyUI's nodes), then calls :func:`serve`.

Channels: a worker's stdin carries one line per command (``run <n>`` / ``exit``; end of file = the parent
is gone, so an idle worker never outlives it); its stdout carries status lines (``ready``, ``done``,
``cancelled``, ``error <text>``), library prints go to its stderr (the console). Everything of a run travels
over torch.distributed: the process group is created for each run and destroyed after it (no collective
waits while idle, so the group timeout bounds only work in progress, and two pools, e.g. a base DiT and an
SR DiT, take turns using the one default group a process may have). Rank 0 broadcasts the stage request
(tensors as CPU tensors, no hooks), every rank runs the same stage with the same seed, rank 0 returns the
result. CPU tensors go over gloo (the request, the cancel flags), CUDA tensors over NCCL.

Cancel: before every model call each rank calls its ``check_cancel``, and that is a broadcast of rank 0's
answer (its own check, e.g. ComfyUI's interrupt flag), so every rank takes the same branch. Any other
failure (a worker dead or stuck, an error on any rank) ends the run within the group timeout with a
:class:`WorkerError`; the pool is then shut down and the next run starts fresh workers.
"""

import base64
import dataclasses
import datetime
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .dit.fusion import fuse
from .dit.loading import load_dit
from .dit.parallel import ParallelPlan
from .sampling.long_clips import generate_long, generate_long_sr
from .sampling.loops import NO_HOOKS, Hooks

STAGES = {"base": generate_long, "sr": generate_long_sr}  # called as STAGES[name](dit, *args)
PACKAGE = __name__.removesuffix(".pipeline.workers")
ROOT = Path(__file__).resolve().parents[1]
BOOT = (
    "import importlib.util, sys\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"  # not the caller's folder (ComfyUI's)
    "root, name = sys.argv[1], sys.argv[2]\n"
    "spec = importlib.util.spec_from_file_location(name, root + '/__init__.py', "
    "submodule_search_locations=[root])\n"
    "sys.modules[name] = importlib.util.module_from_spec(spec)\n"
    "importlib.import_module(name + '.pipeline.workers').serve()\n"
)


class WorkerError(RuntimeError):
    """A multi-device run failed because of a worker (or could not reach one); the pool is shut down."""


class StageCancelled(Exception):
    """A worker's side of a cancel: rank 0 asked every rank to stop at this step."""


@dataclass(frozen=True)
class LoadSettings:
    """How every rank loads its replica: the loader node's settings."""

    path: str
    variant: str
    compute: str = "auto"
    attention: str = "sdpa"
    swap_layers: int = 0
    fast_accum: bool = False
    compile: str = "auto"

    def load(self, device: torch.device):
        dit, _ = load_dit(
            self.path, self.variant, self.compute, device, self.attention,
            swap_layers=self.swap_layers, fast_accum=self.fast_accum,
        )  # fmt: skip
        fuse(dit, self.compile, device)
        return dit


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker is told at start (pickled onto its first stdin line)."""

    rank: int
    world: int
    device: str
    port: int
    timeout_s: float
    settings: LoadSettings


def backend(device: torch.device) -> str:
    # CPU tensors (requests, cancel flags) over gloo in every case; CUDA tensors (activations) over NCCL.
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def join(config: WorkerConfig, run: int) -> None:
    """Join run ``run``'s process group (a fresh key prefix on the pool's store for every run)."""
    if config.device.startswith("cuda"):
        # Without blocking wait NCCL's watchdog kills the whole process on a timeout (ComfyUI itself, on
        # rank 0); with it the waiting collective raises instead.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store = dist.TCPStore("127.0.0.1", config.port, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend(torch.device(config.device)), store=dist.PrefixStore(f"run{run}/", store),
        rank=config.rank, world_size=config.world, timeout=timeout,
    )  # fmt: skip


def collective_cancel(local: Callable[[], None] | None) -> Callable[[], None]:
    """``check_cancel`` for every rank: rank 0 runs ``local`` (its own check) and broadcasts whether it
    raised; every rank then raises (rank 0 its own exception, workers :class:`StageCancelled`) or goes on."""

    def check() -> None:
        stop = None
        if dist.get_rank() == 0 and local is not None:
            try:
                local()
            except BaseException as e:  # ComfyUI's interrupt is a BaseException
                stop = e
        flag = torch.tensor([stop is not None], dtype=torch.uint8)
        dist.broadcast(flag, 0)
        if stop is not None:
            raise stop
        if flag.item():
            raise StageCancelled()

    return check


def to_cpu(value):
    """Tensors in (nested tuples and dataclasses of) a request moved to the CPU, for pickling."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return replace(value, **changes)
    return value


def stage_call(stage: str, request, device: torch.device, hooks: Hooks, world: int):
    """The request as every rank runs it: on its own device, in the group, with these hooks. The base
    model's two guidance branches go to separate ranks with 2 ranks (as ``cli.py --parallel auto``)."""
    cfg = stage == "base" and getattr(request, "mode", None) == "base" and world == 2
    return replace(request, device=device, hooks=hooks, parallel=ParallelPlan(cfg=cfg))


def serve() -> None:
    """A worker's whole life: load, report ready, then one run per ``run`` line until ``exit`` or EOF."""
    status = os.fdopen(os.dup(1), "w", buffering=1)  # the status channel ...
    os.dup2(2, 1)  # ... and everything else printed goes to the console
    config: WorkerConfig = pickle.loads(base64.b64decode(sys.stdin.readline()))
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # CPU workers are for tests; they share the cores with rank 0
    try:
        dit = config.settings.load(device)
        status.write("ready\n")
        for line in sys.stdin:
            command = line.split()
            if command[:1] != ["run"]:
                break
            join(config, int(command[1]))
            try:
                payload = [None]
                dist.broadcast_object_list(payload, src=0)
                stage, args = payload[0]
                hooks = Hooks(check_cancel=collective_cancel(None))
                *inputs, request = args
                STAGES[stage](dit, *inputs, stage_call(stage, request, device, hooks, config.world))
                status.write("done\n")
            except StageCancelled:
                status.write("cancelled\n")
            finally:
                dist.destroy_process_group()
    except BaseException as e:
        status.write(f"error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n")
        raise SystemExit(1) from e


def stop_processes(processes: list, grace_s: float = 10.0) -> None:
    """Ask every worker to exit (an idle one does at once), then kill what is left after ``grace_s``."""
    for process in processes:
        try:
            process.stdin.write(b"exit\n")
            process.stdin.close()
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    processes.clear()


class Worker:
    """One worker process and the lines it has reported (read by a thread, so waits have a timeout)."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, str(ROOT), PACKAGE], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(base64.b64encode(pickle.dumps(config)) + b"\n")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.decode(errors="replace").strip())

    @property
    def name(self) -> str:
        return f"worker {self.config.rank} (process {self.process.pid}, {self.config.device})"

    def send(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except OSError as e:
            raise WorkerError(f"{self.name} is gone ({e})") from e

    def state(self) -> str:
        """What went wrong with it, for error messages."""
        code = self.process.poll()
        errors = [line for line in list(self.lines.queue) if line.startswith("error")]
        said = f": {errors[-1].removeprefix('error ')}" if errors else ""
        return f"{self.name} exited with code {code}{said}" if code is not None else f"{self.name} is running"

    def wait_for(self, expected: tuple[str, ...], timeout_s: float) -> str:
        """The next status line, which must be one of ``expected``; a clear error if the worker exits, says
        something else or stays silent for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    raise WorkerError(self.state()) from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"{self.name} did not answer within {timeout_s:.0f} s") from None
                continue
            if line in expected:
                return line
            raise WorkerError(f"{self.name} reported {line!r} (expected {' or '.join(expected)})")


class WorkerPool:
    """Ranks 1..len(devices) for a DiT this process (rank 0, on ``device``) holds too; started on first use
    (or :meth:`start`), kept between runs, shut down by :meth:`shutdown`, when garbage-collected and at
    interpreter exit. ``timeout_s``: how long any rank waits for another inside a run; ``load_timeout_s``:
    how long a worker may take to load its replica."""

    def __init__(self, settings: LoadSettings, device: torch.device, workers: list[torch.device],
                 timeout_s: float = 120.0, load_timeout_s: float = 1800.0):  # fmt: skip
        self.settings, self.device, self.devices = settings, torch.device(device), list(workers)
        self.timeout_s, self.load_timeout_s = timeout_s, load_timeout_s
        self.workers: list[Worker] = []
        self.processes: list[subprocess.Popen] = []  # shared with the finalizer (which must not hold self)
        self.store = None
        self.ready = False  # every worker has reported its replica loaded
        self.runs = 0
        weakref.finalize(self, stop_processes, self.processes)  # also runs at interpreter exit

    @property
    def world(self) -> int:
        return len(self.devices) + 1

    @property
    def started(self) -> bool:
        return bool(self.workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def start(self) -> None:
        """Start the workers and return once each has loaded its replica (or raise naming the one that
        failed). The caller may load its own replica meanwhile: call :meth:`wait_ready` afterwards."""
        if self.started:
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout, wait_for_workers=False)
        for rank, device in enumerate(self.devices, start=1):
            config = WorkerConfig(
                rank, self.world, str(device), self.store.port, self.timeout_s, self.settings
            )
            self.workers.append(Worker(config))
            self.processes.append(self.workers[-1].process)

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            for worker in self.workers:
                worker.wait_for(("ready",), self.load_timeout_s)
            self.ready = True
        except WorkerError as e:
            self.shutdown()
            raise WorkerError(f"MagiHuman: a DiT worker failed to load its replica: {e}. {ADVICE}") from e

    def shutdown(self) -> None:
        stop_processes(self.processes)
        self.workers.clear()
        self.store, self.ready = None, False

    def run(self, stage: str, dit, *args):
        """Run ``STAGES[stage](dit, *args)`` on every rank (the last argument is the stage request, with this
        process's hooks and device); returns rank 0's result. Raises :class:`WorkerError` (and shuts the pool
        down) when a worker fails; rank 0's own cancel exception when its ``check_cancel`` raises."""
        if dist.is_initialized():
            raise WorkerError(
                "MagiHuman: this process already belongs to a torch.distributed group (another node or pack "
                "started one), so the DiT workers cannot join theirs; set gpus to 1"
            )
        self.start()
        self.wait_ready()
        *inputs, request = args
        run, self.runs = self.runs, self.runs + 1
        cancelled = []

        def local_check():
            try:
                if request.hooks.check_cancel:
                    request.hooks.check_cancel()
            except BaseException:
                cancelled.append(True)
                raise

        hooks = replace(request.hooks, check_cancel=collective_cancel(local_check))
        try:
            for worker in self.workers:
                worker.send(f"run {run}\n".encode())
            join(
                WorkerConfig(0, self.world, str(self.device), self.store.port, self.timeout_s, self.settings),
                run,
            )
            try:
                sent = replace(request, hooks=NO_HOOKS, parallel=None, device="cpu")
                dist.broadcast_object_list([(stage, to_cpu((*inputs, sent)))], src=0)
                result = STAGES[stage](
                    dit, *inputs, stage_call(stage, request, self.device, hooks, self.world)
                )
            finally:
                dist.destroy_process_group()
            for worker in self.workers:
                worker.wait_for(("done",), self.timeout_s)
            return result
        except BaseException as e:
            if cancelled and not isinstance(e, WorkerError | dist.DistError):
                self._after_cancel()
                raise
            raise self._failed(e) from e

    def _after_cancel(self) -> None:
        try:
            for worker in self.workers:
                worker.wait_for(("cancelled",), self.timeout_s)
        except WorkerError:
            self.shutdown()  # the cancel stands; the next run starts fresh workers

    def _failed(self, error: BaseException) -> WorkerError:
        time.sleep(0.5)  # a killed worker's exit code and last words arrive just after the broken connection
        states = [w.state() for w in self.workers]
        gone = [s for s in states if not s.endswith("is running")] or [
            f"{w.name} is still running but stopped answering (stuck, or slower than the "
            f"{self.timeout_s:.0f} s a rank waits for another)"
            for w in self.workers
        ]
        self.shutdown()
        return WorkerError(
            f"MagiHuman: the run over {self.world} devices failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); {'; '.join(gone)}. {ADVICE}"
        )


ADVICE = (
    "The workers were shut down and the next run starts fresh ones. If it happens again, look at the "
    "console for the worker's own error (out of memory on its GPU is the usual one), or set gpus to 1"
)
