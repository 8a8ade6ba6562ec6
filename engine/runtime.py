"""Where a stage runs: the device, the ranks of a ``torchrun`` job and their collectives, mixed
precision, the optimiser's parameter groups, and the child processes that must die with their parent.

The one owner of these concerns: ``select``, ``train-scorer``, ``pretrain`` and ``eval`` all come here.
Outside torchrun (no ``WORLD_SIZE``, or 1) every rank helper is a no-op on a single rank, so the same
stage code runs in one process or many. torch is imported inside the functions that need it, so that
``blissctl --help`` and the reader workers stay light.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place in a ``torchrun`` job (rank 0 of 1 alone)."""

    device: str = "cpu"
    """``cpu`` or ``cuda:N`` (``torch_device`` for torch)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    in_group: bool = False
    """Launched by torchrun and joined its process group (even with one process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank: collectives do something."""
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    def owns(self, shard_index: int) -> bool:
        """Shards are dealt round-robin: disjoint, and balanced when shards are alike."""
        return deals_to(shard_index, self.rank, self.world_size)


def deals_to(shard_index: int, part: int, parts: int) -> bool:
    """Whether input shard ``shard_index`` (in the sorted input order) belongs to ``part`` of ``parts``:
    round-robin, so parts are disjoint, cover every shard, and stay balanced when shards are alike. The
    one rule torchrun ranks and independent ``select --shard-index`` jobs share."""
    return shard_index % parts == part


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own (read from torchrun's environment)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def start_runtime(device: str = "auto") -> Runtime:
    """Pick the device and join the process group torchrun set up (NCCL on CUDA, gloo on CPU).

    ``device`` is ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun each
    rank takes the GPU of its local rank. On CUDA, TF32 matmuls are allowed (bf16 autocast does the
    rest). A CPU-only stage on its own does not import torch at all.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    in_group = launched_by_torchrun()
    if device == "cpu" and not in_group:
        return Runtime(device="cpu")
    import torch
    import torch.distributed as dist

    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank if in_group else (chosen.index or 0))
        torch.cuda.set_device(chosen)  # NCCL collectives run on the current device: make it this rank's
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if in_group and not dist.is_initialized():
        cuda = chosen.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=chosen if cuda else None)
    return Runtime(device=str(chosen), rank=rank, local_rank=local_rank, world_size=world_size, in_group=in_group)


def stop_runtime(runtime: Runtime) -> None:
    """Leave the process group explicitly: a rank whose gloo threads are torn down at interpreter exit
    while another rank still talks to it aborts ("terminate called without an active exception")."""
    if runtime.in_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather(runtime: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not runtime.distributed:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(runtime: Runtime, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not runtime.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if runtime.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- device, precision, optimiser ------------------------------------------------------------------


def resolve_device(spec: str):
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; one line when
    CUDA is asked for and absent."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return torch.device(spec)


def autocast(device):
    """bf16 autocast on CUDA for plain forward and backward passes; a no-op context on CPU (fp32)."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def adamw_param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups with weight decay on matrices only (not biases and norms): GPT-NeoX,
    nanoGPT and Pythia practice, shared by the proxy, the score model and pretraining."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- threads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadPlan:
    """How many torch threads this process runs, and why (printed at the start of a stage)."""

    threads: int
    cores: int
    processes: int
    """Processes of this stage on this machine (torchrun ranks of one node)."""
    busy: int
    """Cores other work kept busy when the stage started (``busy_cores_elsewhere``)."""
    requested: bool
    from_environment: bool = False
    """The request came from ``OMP_NUM_THREADS``, not ``--threads``."""

    def describe(self, what: str = "torch threads") -> str:
        if self.requested:
            return f"{what}: {self.threads} ({'OMP_NUM_THREADS' if self.from_environment else '--threads'})"
        reasons = [f"{self.cores} core(s)"]
        if self.busy:
            reasons.append(f"less {self.busy} busy with other work")
        return (f"{what}: {self.threads} ({', '.join(reasons)}, ÷ {self.processes} process(es); "
                "--threads to change)")


def usable_cpus() -> list[int] | None:
    """The CPUs this process may run on (its affinity, as a container or taskset sets it); None where
    the platform does not say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def available_cores() -> int:
    """How many cores this process may run on."""
    cpus = usable_cpus()
    return max(1, len(cpus) if cpus is not None else (os.cpu_count() or 1))


def busy_cores_elsewhere(interval_s: float = 0.3) -> int:
    """Cores other processes keep busy right now: the CPU time the machine's cores (those this process
    may use) spent outside idle over ``interval_s``, less this process's own, rounded to whole cores.
    0 when it cannot be read."""
    try:
        import psutil

        me = psutil.Process()
        cpus = usable_cpus()
        me.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)
        time.sleep(interval_s)
        mine = me.cpu_percent(None) / 100
        per_cpu = psutil.cpu_percent(None, percpu=True)
    except Exception:  # no reading (no psutil, no /proc): plan as if the machine were idle
        return 0
    used = sum(per_cpu[i] for i in cpus if i < len(per_cpu)) / 100 if cpus else sum(per_cpu) / 100
    return max(0, round(used - mine))


def plan_threads(*, processes: int = 1, busy: int = 0, requested: int | None = None) -> ThreadPlan:
    """Threads from the cores there really are: cores less those other work keeps busy, ÷ processes,
    at least one. (Reader workers are not subtracted: feeding a model they take a fraction of a core;
    ``select`` measured 411 docs/s with 2 threads beside one worker on 2 cores, 358 with 1.)

    A parallel region ends only when its slowest thread does: with a thread per core and one core
    taken by another process, torch's OpenMP threads wait on the descheduled one (measured: pretrain 6×
    slower with 2 threads than with 1 while one of the two cores was busy). So ``busy`` (what
    ``busy_cores_elsewhere`` read at the start) is left out. The count changes the order of
    floating-point reductions, so a run on a loaded machine may differ in the last bits from one on an
    idle machine; it is printed and recorded in the start event, and ``--threads`` fixes it.
    """
    cores = available_cores()
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be at least 1, got {requested}")
        return ThreadPlan(threads=requested, cores=cores, processes=processes, busy=0, requested=True)
    threads = max(1, (cores - busy) // max(1, processes))
    return ThreadPlan(threads=threads, cores=cores, processes=processes, busy=busy, requested=False)


def omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a whole number: the user's choice, as torch itself reads it."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def thread_plan(*, processes: int = 1, requested: int | None = None, read_load: bool = True) -> ThreadPlan:
    """``plan_threads`` for this machine now: ``--threads``, else ``OMP_NUM_THREADS``, else the cores that
    the load read now leaves (``read_load=False`` where sibling ranks starting up would read as load)."""
    if requested is None and (from_env := omp_num_threads()) is not None:
        return dataclasses.replace(plan_threads(processes=processes, requested=from_env), from_environment=True)
    busy = busy_cores_elsewhere() if requested is None and read_load else 0
    return plan_threads(processes=processes, busy=busy, requested=requested)


# --- memory ---------------------------------------------------------------------------------------

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc ``mallopt`` parameters (malloc.h)."""


def reuse_freed_memory() -> bool:
    """Keep memory that torch frees for its next allocation instead of handing it back to the kernel
    (glibc only; a no-op elsewhere). True when the setting took.

    Every training or scoring step allocates and frees the same large tensors (the demo's logits alone,
    16 × 128 × 8,192 floats, are 67 MB). glibc serves each allocation past its mmap threshold (at most
    32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so the kernel zeroes every page
    again at the next step: over 30 tiny pretrain steps that was 2.19M minor page faults and 7.3 s of
    system time against 0.31M and 1.8 s with the heap kept (bench/README_bliss.md). The high-water mark
    is what it was; freed memory just stays with the process until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


# --- child processes ------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Called first thing in every process blissctl starts (reader and writer pools, packing workers,
    torchrun and its trainers), so that a ``kill -9`` of the command a user started leaves no process
    behind. ``parent_pid`` is the pid the parent had when it started us: if it is already gone by the
    time the request takes effect, this process ends at once. Elsewhere than Linux it does nothing;
    ``parent_is_alive`` is the portable check for worker loops.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the liveness checks still apply
            pass
    if not parent_is_alive(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


def parent_is_alive(parent_pid: int) -> bool:
    """Whether the process that started this one still runs (an orphan is re-parented)."""
    return os.getppid() == parent_pid
