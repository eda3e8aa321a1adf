"""Device, precision, distributed set-up and seeding.

Works unchanged under ``torchrun --nproc_per_node=N``: NCCL on GPU, gloo on CPU. Only rank 0 logs
and writes. Randomness is derived from (seed, rank, step) so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun, pick the device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # TF32 for the fp32 parts (matmuls and convolutions outside autocast).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if precision == "bf16" and dev.type == "cpu":
        amp = torch.bfloat16
    elif precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        amp = torch.bfloat16
    else:
        amp = None
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank, amp_dtype=amp)


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
