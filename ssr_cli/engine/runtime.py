"""Device, precision, distributed set-up and seeding.

Works unchanged under ``torchrun --nproc_per_node=N``: NCCL on GPU, gloo on CPU. Only rank 0 logs
and writes. Randomness is derived from (seed, rank, step) so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ssr_cli.errors import UserRuntimeError, UserValueError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    """bf16 on CUDA by default; None means full fp32."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserRuntimeError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def cpu_times(cpus: set[int], stat_text: str | None = None) -> tuple[int, int] | None:
    """(idle, total) jiffies summed over ``cpus`` from /proc/stat (or ``stat_text`` in its format); None
    where it cannot be read."""
    if stat_text is None:
        try:
            stat_text = Path("/proc/stat").read_text()
        except OSError:
            return None
    idle = total = 0
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        values = [int(v) for v in fields[:8]]
        idle += values[3] + values[4]  # idle + iowait
        total += sum(values)
    return (idle, total) if total else None


@functools.lru_cache(maxsize=1)
def free_cores(window_s: float = 0.2) -> int:
    """The number of this process's CPUs that were idle over ``window_s`` (rounded, at least 1)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(cpu_set_size()))
    before = cpu_times(cpus)
    if before is None:
        return len(cpus)
    time.sleep(window_s)
    after = cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return len(cpus)
    idle_fraction = (after[0] - before[0]) / (after[1] - before[1])
    return max(1, min(len(cpus), round(idle_fraction * len(cpus))))


def cpu_set_size() -> int:
    """The number of CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads(threads: int | str = 0, local_world_size: int = 1) -> int:
    """Set torch's intra-op threads: ``threads`` when > 0; 0: the CPU set's cores, "auto": the free cores —
    both shared among the ``local_world_size`` ranks of this host. Returns the count set."""
    if threads == "auto":
        n = max(1, free_cores() // max(1, local_world_size))
    elif isinstance(threads, int) and threads > 0:
        n = threads
    elif threads == 0:
        n = max(1, cpu_set_size() // max(1, local_world_size))
    else:
        raise UserValueError(f"run.threads must be a positive integer, 0 or \"auto\", got {threads!r}")
    torch.set_num_threads(n)
    return n


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int | str | None = None) -> Runtime:
    """Initialise the process group when launched by torchrun, pick the device and precision; ``threads``
    (``run.threads``; None leaves torch's setting alone) sets the CPU threads (see :func:`set_cpu_threads`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if threads is not None:
        set_cpu_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # TF32 for the fp32 parts (matmuls and convolutions outside autocast).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    amp = torch.bfloat16 if precision == "bf16" or (precision == "auto" and dev.type == "cuda") else None
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank, amp_dtype=amp)


def peak_memory(device: torch.device) -> str:
    """Peak memory so far, as text: the CUDA allocator's peak on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def step_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed derived from the run seed and any labels (rank, step, purpose)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator_for(seed: int, *parts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(step_seed(seed, *parts))
    return gen


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        states = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
