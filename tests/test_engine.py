"""The shared engine: schedule, EMA, checkpoints, exact resume, DDP on CPU."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ssr_cli.data import StepSampler
from ssr_cli.engine import EMA, Checkpointer, TrainSpec, lr_lambda, setup_runtime, train
from ssr_cli.engine.checkpoint import load_checkpoint_file
from ssr_cli.engine.optim import ParamGroup, build_optimizer
from ssr_cli.engine.progress import read_metrics


def test_warmup_hold_cosine_schedule_closed_form():
    lr, lr_init, lr_min, total = 1e-5, 1e-7, 1e-6, 100
    f = lr_lambda(schedule="warmup_cosine", total_steps=total, lr=lr, lr_init=lr_init, lr_min=lr_min,
                  warmup_frac=0.1, cosine_frac=0.5)
    assert f(0) * lr == pytest.approx(lr_init)
    assert f(5) * lr == pytest.approx(lr_init + (lr - lr_init) * 0.5)
    for s in (10, 30, 50):
        assert f(s) * lr == pytest.approx(lr)
    assert f(75) * lr == pytest.approx(lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * 0.5)))
    assert f(100) * lr == pytest.approx(lr_min)
    assert lr_lambda(schedule="constant", total_steps=10, lr=1.0)(7) == 1.0


def test_param_groups_lr_mult_and_weight_decay():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = build_optimizer([ParamGroup("main", [a]), ParamGroup("ssr", [b], lr_mult=0.1, weight_decay=0.0)],
                          lr=1e-3, weight_decay=0.05)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["main"]["lr"] == pytest.approx(1e-3) and groups["main"]["weight_decay"] == 0.05
    assert groups["ssr"]["lr"] == pytest.approx(1e-4) and groups["ssr"]["weight_decay"] == 0.0


def test_ema_closed_form():
    live = nn.Linear(2, 2)
    ema = EMA(live, decay=0.9)
    start = ema.shadow.weight.detach().clone()
    with torch.no_grad():
        live.weight.fill_(3.0)
    for _ in range(5):
        ema.update(live)
    expected = 3.0 + 0.9**5 * (start - 3.0)
    torch.testing.assert_close(ema.shadow.weight, expected)
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_checkpointer_atomic_keep_last_and_corrupt_fallback(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((2,), float(step))})
    assert [s for s, _ in ck.list()] == [2, 3]
    assert not list(tmp_path.glob(".*tmp*"))
    # Truncate the newest: it must be skipped with a warning in favour of the previous one.
    newest = ck.path_for(3)
    newest.write_bytes(newest.read_bytes()[:20])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        state = ck.load_latest()
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    from ssr_cli.engine.checkpoint import CheckpointRefused

    ck = Checkpointer(tmp_path)
    ck.save(1, {"w": torch.ones(2)})
    torch.save({"step": 2, "obj": Path("x")}, ck.path_for(2))  # not plain tensors: weights_only refuses it
    # Foreign content is not damage: the run stops naming the file instead of falling back to step 1 unnoticed.
    with pytest.raises(CheckpointRefused, match=r"step_00000002\.pt holds pickled code or objects other than tensors"):
        ck.load_latest()
    ck.path_for(2).unlink()  # what the message says to do
    assert ck.load_latest()["step"] == 1


class ToyTask(nn.Module):
    """Regression with dropout and noise drawn from torch's global RNG, so resume must restore seeds."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, batch, step_rng):
        x, y = batch
        x = x + 0.01 * torch.randn_like(x)
        scale = 1.0 + torch.rand((), generator=step_rng)
        loss = ((self.net(x).squeeze(-1) - y) ** 2).mean() * scale
        return {"loss": loss, "scale": scale}


def _toy_batches(seed: int, rank: int = 0, world: int = 1):
    gen = torch.Generator().manual_seed(123)
    xs = torch.randn(40, 4, generator=gen)
    ys = xs.sum(-1).sin()

    def batches(start_step: int):
        for idx in StepSampler(40, 4, seed=seed, rank=rank, world_size=world, start=start_step * 2):
            i = torch.tensor([k for k, _ in idx])
            yield xs[i], ys[i]

    return batches


def _toy_spec(run_dir: Path, steps: int, hooks=()) -> TrainSpec:
    torch.manual_seed(0)
    model = ToyTask()
    ema = EMA(model, 0.9)
    return TrainSpec(
        name="toy", model=model, param_groups=[ParamGroup("all", list(model.parameters()))],
        batches=_toy_batches(seed=7), steps=steps, lr=1e-2, run_dir=run_dir, grad_clip=1.0, grad_accum=2,
        emas={"model": (ema, lambda: model)}, ckpt_every=3, keep_last=5, log_every=1, seed=7,
        schedule=lr_lambda(schedule="warmup_cosine", total_steps=steps, lr=1e-2, lr_init=1e-4, lr_min=1e-3,
                           warmup_frac=0.2, cosine_frac=0.5),
        hooks=list(hooks),
    )


class Interrupt(Exception):
    pass


def _raise_at(step_to_stop: int):
    def hook(step):
        if step == step_to_stop:
            raise Interrupt

    return hook


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    rt = setup_runtime("cpu", "fp32")
    full = _toy_spec(tmp_path / "full", 8)
    train(full, rt)

    spec = _toy_spec(tmp_path / "cut", 8, hooks=[(1, _raise_at(4))])
    with pytest.raises(Interrupt):
        train(spec, rt)  # dies at step 4; newest checkpoint is step 3
    resumed = _toy_spec(tmp_path / "cut", 8)
    result = train(resumed, rt)
    assert result.resumed_from == 3
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    ema_full = full.emas["model"][0].state_dict()
    ema_res = resumed.emas["model"][0].state_dict()
    assert all(torch.equal(ema_full[k], ema_res[k]) for k in ema_full)
    losses_full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))  # no duplicate records after resume
    assert [r["loss"] for r in records] == losses_full
    ckpt = load_checkpoint_file(Checkpointer(tmp_path / "cut" / "checkpoints").path_for(8))
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "ema", "recipe", "step"}  # no RNG: every step reseeds
    # Re-running a finished run does nothing.
    assert train(_toy_spec(tmp_path / "cut", 8), rt).resumed_from == 8


def test_step_sampler_resume_and_ranks():
    full = StepSampler(10, 3, seed=1, start=0)
    it = iter(full)
    first = [next(it) for _ in range(7)]
    later = iter(StepSampler(10, 3, seed=1, start=4))
    assert [next(later) for _ in range(3)] == first[4:]
    # Two ranks together cover what one rank with the doubled batch covers.
    r0, r1 = iter(StepSampler(10, 3, seed=1, rank=0, world_size=2)), iter(StepSampler(10, 3, seed=1, rank=1, world_size=2))
    big = iter(StepSampler(10, 6, seed=1))
    for _ in range(4):
        assert next(r0) + next(r1) == next(big)


def _spawn(fn, args: tuple, nprocs: int = 2) -> None:
    """``mp.spawn`` through a fork server that has imported this module, torch._dynamo (which the first optimizer
    imports) and matplotlib (the training curves) once: each rank is forked from it instead of starting a fresh
    interpreter that imports them again (~5 s per process on one core). The server forks before any torch op has
    run, so no thread pool is inherited. The ranks inherit the server's working folder and output streams (from the
    first test that started it: the workers use absolute paths; a rank's traceback still reaches the test), and a
    preload that fails to import is skipped silently (only slower)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch._dynamo", "ssr_cli.plots"])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int):
    """This process as rank ``rank`` of a CPU (gloo) group, with a ToyTask made from seed 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = setup_runtime("cpu", "fp32")
    torch.manual_seed(0)
    return rt, ToyTask()


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    rt, model = _gloo_rank(rank, world, port)
    spec = TrainSpec(
        name="ddp", model=model, param_groups=[ParamGroup("all", list(model.parameters()))],
        batches=_toy_batches(seed=3, rank=rank, world=world), steps=3, lr=1e-2, run_dir=Path(out_dir),
        ckpt_every=100, log_every=1, seed=3, grad_accum=2,
    )
    train(spec, rt)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out_dir) / f"rank{rank}.pt")
    rt.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one worker, one fork server for both
def test_ddp_gloo_two_processes_end_identical(tmp_path):
    _spawn(_ddp_worker, (2, _free_port(), str(tmp_path)))
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    torch.manual_seed(0)
    start = ToyTask().state_dict()
    assert not all(torch.equal(s0[k], start[k]) for k in s0)  # it did train
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # rank 0 alone writes


def _sigterm_worker(rank: int, world: int, port: int, out_dir: str, term_at: int) -> None:
    import signal

    from ssr_cli.engine.loop import Preempted

    rt, model = _gloo_rank(rank, world, port)

    def term(step):  # rank 0 alone is signalled; every rank must stop at the same step boundary
        if step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    spec = TrainSpec(
        name="ddp", model=model, param_groups=[ParamGroup("all", list(model.parameters()))],
        batches=_toy_batches(seed=3, rank=rank, world=world), steps=6, lr=1e-2, run_dir=Path(out_dir),
        ckpt_every=100, log_every=1, seed=3, grad_accum=2, hooks=[(1, term)] if term_at else [],
    )
    try:
        train(spec, rt)
        done = "finished"
    except Preempted:
        done = "preempted"
    torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "done": done},
               Path(out_dir) / f"rank{rank}.pt")
    rt.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # one worker, one fork server for both
def test_sigterm_under_two_gloo_ranks_checkpoints_and_resumes_identically(tmp_path):
    def spawn(out, term_at):
        _spawn(_sigterm_worker, (2, _free_port(), str(out), term_at))
        return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    full = spawn(tmp_path / "full", 0)
    cut = spawn(tmp_path / "cut", 2)
    assert [r["done"] for r in cut] == ["preempted", "preempted"]
    assert [s for s, _ in Checkpointer(tmp_path / "cut" / "checkpoints").list()] == [3]
    resumed = spawn(tmp_path / "cut", 0)
    assert [r["done"] for r in resumed] == ["finished", "finished"]
    for r in resumed:
        assert all(torch.equal(r["state"][k], full[0]["state"][k]) for k in full[0]["state"])

STAT = """cpu  300 0 300 400 0 0 0 0 0 0
cpu0 100 0 100 200 0 0 0 0 0 0
cpu1 200 0 200 200 0 0 0 0 0 0
intr 12345
"""
STAT_LATER = """cpu  400 0 300 700 0 0 0 0 0 0
cpu0 100 0 100 400 0 0 0 0 0 0
cpu1 300 0 200 300 0 0 0 0 0 0
intr 12399
"""


def test_cpu_times_read_the_cpus_of_the_set_only():
    from ssr_cli.engine.runtime import cpu_times

    assert cpu_times({0}, STAT) == (200, 400) and cpu_times({0, 1}, STAT) == (400, 1000)
    # over the interval cpu0 was idle throughout (200 of 200 jiffies), cpu1 half the time (100 of 200)
    (i0, t0), (i1, t1) = cpu_times({0, 1}, STAT), cpu_times({0, 1}, STAT_LATER)
    assert (i1 - i0) / (t1 - t0) == 0.75
    assert cpu_times({5}, STAT) is None


def test_run_threads_sets_torch_threads_and_auto_stays_within_the_cpu_set():
    from ssr_cli.engine.runtime import free_cores, set_cpu_threads

    previous = torch.get_num_threads()
    try:
        assert set_cpu_threads(3) == 3 and torch.get_num_threads() == 3
        cores = len(os.sched_getaffinity(0))
        assert 1 <= free_cores() <= cores
        assert set_cpu_threads("auto") == free_cores()
        assert set_cpu_threads(0) == cores and torch.get_num_threads() == cores
        assert set_cpu_threads(0, local_world_size=cores + 1) == 1  # ranks share the cores, never 0 threads
        assert set_cpu_threads("auto", local_world_size=cores + 1) == 1
    finally:
        torch.set_num_threads(previous)
