"""The one training loop, read top to bottom.

A task hands over a module whose ``forward(batch, step_rng)`` returns a dict of named loss terms with
``"loss"`` the one to minimise, plus its parameter groups and a deterministic batch source. The loop
does the rest: DDP, precision, accumulation, clipping, EMA, schedule, logging, checkpoints, resume.

Reproducibility: before step ``s`` every rank seeds torch with (seed, rank, s), and ``step_rng`` is a
generator seeded with (seed, s) only (identical on all ranks, for choices all ranks must agree on,
like which regularizer branch to take). Batches are a function of the step too, so a run resumed from
a checkpoint repeats an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.ema import EMA
from ssr_cli.engine.optim import ParamGroup, build_optimizer
from ssr_cli.engine.progress import MetricsLog, RateMeter, console, make_progress, read_metrics
from ssr_cli.engine.runtime import Runtime, generator_for, step_seed
from ssr_cli.errors import UserError
from ssr_cli.plots import plot_training_curves


@dataclass
class TrainSpec:
    """Everything one training run needs; each field is a knob of the loop."""

    name: str
    model: nn.Module
    """forward(batch, step_rng) -> dict[str, Tensor] with a scalar "loss"."""
    param_groups: list[ParamGroup]
    batches: Callable[[int], Iterator[Any]]
    """start_step -> iterator of this rank's micro-batches from that step on (grad_accum per step)."""
    steps: int
    lr: float
    run_dir: Path
    schedule: Callable[[int], float] = lambda step: 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    grad_accum: int = 1
    emas: dict[str, tuple[EMA, Callable[[], nn.Module]]] = field(default_factory=dict)
    """name -> (EMA, function returning the live module it follows); updated after every step."""
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    recipe_text: str = ""
    hooks: list[tuple[int, Callable[[int], None]]] = field(default_factory=list)
    """(every_steps, fn(steps_done)) run on rank 0 after those steps and after the last one."""
    find_unused_parameters: bool = False
    compile: bool = False
    images_per_step: int = 0
    """For the img/s readout; 0 hides it."""
    ckpt_subdir: str = "checkpoints"
    max_nonfinite_steps: int = 20
    """Consecutive steps with a non-finite loss or gradient (each skipped) after which the run stops."""
    readings: dict[str, Callable[[], float]] = field(default_factory=dict)
    """name -> fn() whose value is added to every ``metrics.jsonl`` record (e.g. the unreadable-image count)."""


class Preempted(SystemExit):
    """SIGTERM arrived: a checkpoint was written at the step boundary; the process exits 0 (re-run to resume)."""

    def __init__(self) -> None:
        super().__init__(0)


class _StopFlag:
    """Set by SIGTERM while training; checked at every step boundary (the previous handler is restored after)."""

    def __init__(self) -> None:
        self.set = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class DivergenceError(UserError):
    """Training diverged (too many non-finite steps, or non-finite weights); no checkpoint was written with them."""


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int | None
    last_metrics: dict[str, float]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def train(spec: TrainSpec, rt: Runtime) -> TrainResult:
    model = spec.model.to(rt.device)
    optimizer = build_optimizer(
        spec.param_groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.schedule)
    ckpt = Checkpointer(spec.run_dir / spec.ckpt_subdir, keep_last=spec.keep_last)
    metrics = MetricsLog(spec.run_dir / "metrics.jsonl", enabled=rt.is_main)

    start_step = 0
    resumed_from = None
    state = ckpt.load_latest(map_location="cpu")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, (ema, _) in spec.emas.items():
            ema.load_state_dict(state["ema"][name])
        start_step = resumed_from = int(state["step"])
        metrics.truncate_after(start_step)
        if rt.is_main:
            console.print(f"[green]{spec.name}: resuming from step {start_step} ({ckpt.path_for(start_step)})")
    del state

    if start_step >= spec.steps:
        if rt.is_main:
            console.print(f"{spec.name}: already complete ({start_step}/{spec.steps} steps)")
        return TrainResult(start_step, resumed_from, {})

    runner: nn.Module = model
    if spec.compile and rt.device.type == "cuda":
        runner = torch.compile(runner)  # before DDP, so that the DDP wrapper (and its no_sync) stays outermost
    if rt.distributed:
        runner = DistributedDataParallel(
            runner,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=spec.find_unused_parameters,
        )

    def checkpoint_state() -> dict[str, Any]:  # no RNG state: every step reseeds from (seed, rank, step)
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": {name: ema.state_dict() for name, (ema, _) in spec.emas.items()},
            "recipe": spec.recipe_text,
        }

    def all_finite(modules: list[nn.Module]) -> bool:
        return all(bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values()
                   if t.is_floating_point())

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    skipped = consecutive = 0
    last: dict[str, float] = {}
    meter = RateMeter()
    batches = spec.batches(start_step)
    model.train()
    with make_progress(disable=not rt.is_main) as progress, _StopFlag() as stop:
        task = progress.add_task(spec.name, total=spec.steps, completed=start_step, status="", rate="")
        for step in range(start_step, spec.steps):
            torch.manual_seed(step_seed(spec.seed, "torch", rt.rank, step))
            step_rng = generator_for(spec.seed, "step", step)
            optimizer.zero_grad(set_to_none=True)
            step_sums: dict[str, torch.Tensor] = {}
            for micro in range(spec.grad_accum):
                batch = _to_device(next(batches), rt.device)
                sync = micro == spec.grad_accum - 1 or not rt.distributed
                ctx = runner.no_sync() if (not sync and isinstance(runner, DistributedDataParallel)) else contextlib.nullcontext()
                with ctx:
                    with rt.autocast():
                        out = runner(batch, step_rng)
                    (out["loss"].float() / spec.grad_accum).backward()
                for key, value in out.items():
                    if isinstance(value, torch.Tensor) and value.numel() == 1:
                        v = value.detach().float().reshape(())
                        step_sums[key] = step_sums[key] + v if key in step_sums else v.clone()
            # The total gradient norm is finite exactly when every gradient is; clipping at +inf changes nothing.
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip or float("inf"))
            bad = (~torch.isfinite(step_sums["loss"] + grad_norm)).float()
            if rt.all_reduce_mean(bad).item() > 0:  # any rank's non-finite step is every rank's skip
                skipped += 1
                consecutive += 1
                optimizer.zero_grad(set_to_none=True)
                if consecutive >= spec.max_nonfinite_steps:
                    raise DivergenceError(
                        f"{spec.name}: {consecutive} consecutive steps (up to step {step + 1}) had a non-finite loss or "
                        f"gradient and were skipped; lower the learning rate or check the data (no checkpoint holds "
                        f"non-finite weights; the newest good one is in {ckpt.directory})")
            else:
                consecutive = 0
                for key, v in step_sums.items():
                    sums[key] = sums[key] + v if key in sums else v
                count += spec.grad_accum
                if spec.grad_clip is not None:
                    sums["grad_norm"] = sums.get("grad_norm", torch.zeros((), device=grad_norm.device)) \
                        + grad_norm.detach().float() * spec.grad_accum
                optimizer.step()
                for ema, source in spec.emas.values():
                    ema.update(source())
            scheduler.step()  # the LR stays a function of the step index, skipped steps included
            done = step + 1
            meter.tick()

            if done % spec.log_every == 0 or done == spec.steps:
                record = {k: rt.all_reduce_mean(v / count).item() for k, v in sorted(sums.items())} if count else {}
                rate = meter.rate()
                record.update(step=done, lr=optimizer.param_groups[0]["lr"], steps_per_s=rate, skipped_steps=skipped)
                if spec.images_per_step:
                    record["img_per_s"] = rate * spec.images_per_step
                record.update({key: fn() for key, fn in spec.readings.items()})
                metrics.write(record)
                last = record
                sums, count, skipped = {}, 0, 0
                meter.reset()
                status = f"loss {record['loss']:.4g}" if "loss" in record else "all steps skipped (non-finite)"
                speed = f"{rate:.2f} it/s" + (f" · {record['img_per_s']:.1f} img/s" if spec.images_per_step else "")
                progress.update(task, status=status, rate=speed)
            progress.update(task, completed=done)

            stopping = rt.all_reduce_mean(torch.tensor(float(stop.set), device=rt.device)).item() > 0 and done < spec.steps
            if done % spec.ckpt_every == 0 or done == spec.steps or stopping:
                if not all_finite([model, *(ema.shadow for ema, _ in spec.emas.values())]):
                    raise DivergenceError(
                        f"{spec.name}: the weights became non-finite by step {done}; not checkpointing them "
                        f"(the newest good checkpoint is kept in {ckpt.directory}); lower the learning rate")
                if rt.is_main:
                    ckpt.save(done, checkpoint_state())
                rt.barrier()
            if rt.is_main:
                for every, fn in spec.hooks:
                    if done % every == 0 or done == spec.steps:
                        model.eval()
                        fn(done)
                        model.train()
            if stopping:  # every rank saw the same flag (all-reduced), so all stop at this step
                if rt.is_main:
                    console.print(f"[yellow]{spec.name}: SIGTERM: checkpoint written at step {done} "
                                  f"({ckpt.path_for(done)}); run the same command again to resume")
                raise Preempted()
    if rt.is_main:
        _plot_curves(spec)
    return TrainResult(spec.steps, resumed_from, last)


def _plot_curves(spec: TrainSpec) -> None:
    """``curves.png`` beside ``metrics.jsonl``: every logged scalar against the step (the whole run, resumes
    included). A figure that cannot be drawn costs a warning, never the finished run."""
    try:
        records = read_metrics(spec.run_dir / "metrics.jsonl")
        if records:
            path = plot_training_curves(records, spec.run_dir / "curves.png", title=spec.name)
            console.print(f"{spec.name}: training curves in {path}")
    except Exception as exc:  # noqa: BLE001 - plotting must not fail a finished run
        console.print(f"[yellow]{spec.name}: could not draw training curves ({exc})")
