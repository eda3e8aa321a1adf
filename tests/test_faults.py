"""Fault injection: what a long job on shared machines meets (issue 15). Each test fails on the code before it.

Seeded starts (two runs identical, kills anywhere resume identically), stale stages redone when their inputs
change, non-finite steps skipped and never checkpointed, damaged checkpoints detected, failed writes, one
writer per run folder, SIGTERM, 16-bit images, user errors as one line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from ssr_cli.cli import app
from ssr_cli.data import StepSampler, pil_to_tensor
from ssr_cli.engine.ema import EMA
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.loop import TrainSpec, train
from ssr_cli.engine.optim import lr_lambda
from ssr_cli.engine.runtime import setup_runtime
from ssr_cli.engine.checkpoint import CheckpointWriteError, load_checkpoint_file
from ssr_cli.engine.loop import DivergenceError, Preempted
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import read_metrics
from ssr_cli.errors import UserError
from ssr_cli.models.weights import load_state_dict_file, save_weights
from ssr_cli.recipe import dump, from_dict
from ssr_cli.stages.common import build_tokenizer
from ssr_cli.stages.finetune import run_finetune
from ssr_cli.stages.pipeline import run_pipeline

# one xdist group: under `--dist loadgroup` the module-scoped first run is made once
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("faults")]

STAGES = ("finetune", "encode-latents", "train-dit", "sample")


def _recipe(out: Path, name: str = "f", **sections) -> object:
    base = {
        "run": {"name": name, "out_dir": str(out), "device": "cpu", "precision": "fp32"},
        "data": {"source": "builtin", "image_size": 16, "builtin_crops": 8},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "none"},
        "loss": {"lambda_lpips": 0.0},
        "train": {"steps": 4, "batch_size": 4, "ckpt_every_steps": 1, "log_every_steps": 1,
                  "image_every_steps": 100, "lr": 1e-3, "lr_min": 1e-5},
        "latents": {"shard_size": 8, "stats_count": 8, "batch_size": 8},
        "dit": {"model": "DiT-S/2", "depth": 1, "hidden_size": 32, "num_heads": 2, "steps": 3, "batch_size": 4,
                "ckpt_every_steps": 1, "log_every_steps": 1},
        "sample": {"steps": 2, "num_images": 4, "batch_size": 4},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return from_dict(base)


def _same_files(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, one_thread):
    torch.manual_seed(1)  # a process's RNG state: must not matter
    cfg = _recipe(tmp_path_factory.mktemp("first"))
    run_pipeline(cfg, setup_runtime("cpu", "fp32"), stages=STAGES)
    return cfg


def test_two_uninterrupted_runs_are_bit_identical(first_run, tmp_path):
    torch.manual_seed(2)  # another process, another global RNG state
    cfg = _recipe(tmp_path)
    run_pipeline(cfg, setup_runtime("cpu", "fp32"), stages=STAGES)
    a, b = first_run.run_dir(), cfg.run_dir()
    assert _same_files(a / "tokenizer.safetensors", b / "tokenizer.safetensors")
    assert _same_files(a / "dit" / "dit_ema.safetensors", b / "dit" / "dit_ema.safetensors")
    assert np.array_equal(np.load(a / "samples" / "samples.npz")["arr_0"], np.load(b / "samples" / "samples.npz")["arr_0"])


@pytest.mark.slow  # ten short resumed fine-tunings: about 25 s on one thread
def test_kills_at_random_steps_resume_to_the_uninterrupted_weights(first_run, tmp_path):
    """A kill after step k's checkpoint (k = 0: before the first one) is simulated by removing what a kill
    would not have left; the rerun, in a process with another RNG state, must end bit for bit identical."""
    reference = first_run.run_dir() / "tokenizer.safetensors"
    rng = random.Random(15)
    kills = [0] + [rng.randrange(0, first_run.train.steps) for _ in range(9)]
    for trial, k in enumerate(kills):
        run = tmp_path / f"k{trial}"
        shutil.copytree(first_run.run_dir(), run / "f", ignore=shutil.ignore_patterns("latents", "dit", "samples"))
        (run / "f" / "tokenizer.safetensors").unlink()
        for step, path in Checkpointer(run / "f" / "finetune" / "checkpoints").list():
            if step > k:
                path.unlink()
        torch.manual_seed(100 + trial)
        run_finetune(_recipe(run), setup_runtime("cpu", "fp32"))
        assert _same_files(run / "f" / "tokenizer.safetensors", reference), f"kill after step {k}"


def test_changed_finetune_settings_redo_the_finetune_stage(first_run, tmp_path):
    from ssr_cli.stages import finetune

    shutil.copytree(first_run.run_dir(), tmp_path / "f")
    assert finetune.is_complete(_recipe(tmp_path))
    changed = _recipe(tmp_path, train={"lr": 5e-4})
    assert not finetune.is_complete(changed)  # old checkpoints, other settings: not complete
    before = (tmp_path / "f" / "tokenizer.safetensors").read_bytes()
    run_finetune(changed, setup_runtime("cpu", "fp32"))  # discards them and trains again from step 0
    steps = [r["step"] for r in read_metrics(tmp_path / "f" / "finetune" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4] and (tmp_path / "f" / "tokenizer.safetensors").read_bytes() != before
    assert finetune.is_complete(changed)


def test_tokenizer_change_redoes_every_later_stage(first_run, tmp_path):
    shutil.copytree(first_run.run_dir(), tmp_path / "f")
    cfg = _recipe(tmp_path)
    run = cfg.run_dir()
    old_dit, old_samples = load_file(str(run / "dit" / "dit_ema.safetensors")), np.load(run / "samples" / "samples.npz")["arr_0"]
    rt = setup_runtime("cpu", "fp32")
    assert set(run_pipeline(cfg, rt, stages=STAGES)["stages"].values()) == {"skipped (complete)"}
    tok = build_tokenizer(cfg, weights=run / "tokenizer.safetensors")
    with torch.no_grad():
        for p in tok.parameters():
            p.mul_(1.1)
    save_weights(tok, run / "tokenizer.safetensors")  # e.g. fine-tuned again, or replaced by hand
    stages = run_pipeline(cfg, rt, stages=STAGES)["stages"]
    assert stages["finetune"] == "skipped (complete)"
    assert all(stages[s].endswith(" s") for s in ("encode-latents", "train-dit", "sample")), stages
    new_dit = load_file(str(run / "dit" / "dit_ema.safetensors"))
    assert not all(torch.equal(old_dit[k], new_dit[k]) for k in old_dit)  # retrained, not resumed as "complete"
    assert not np.array_equal(old_samples, np.load(run / "samples" / "samples.npz")["arr_0"])
    # Same inputs again: everything is skipped.
    assert set(run_pipeline(cfg, rt, stages=STAGES)["stages"].values()) == {"skipped (complete)"}


def test_sample_redraws_pngs_when_its_settings_change(first_run, tmp_path):
    from ssr_cli.stages.sample import run_sample

    shutil.copytree(first_run.run_dir(), tmp_path / "f")
    before = np.load(tmp_path / "f" / "samples" / "samples.npz")["arr_0"]
    cfg = _recipe(tmp_path, sample={"seed": 1})  # other noise: other images (the old code kept the PNGs)
    run_sample(cfg, setup_runtime("cpu", "fp32"))
    assert not np.array_equal(before, np.load(tmp_path / "f" / "samples" / "samples.npz")["arr_0"])
    cfg = _recipe(tmp_path)  # and back: the first images again, bit for bit
    run_sample(cfg, setup_runtime("cpu", "fp32"))
    assert np.array_equal(before, np.load(tmp_path / "f" / "samples" / "samples.npz")["arr_0"])


def test_later_stage_without_a_tokenizer_is_a_user_error_not_a_random_init(tmp_path):
    from ssr_cli.stages.encode_latents import encode_latents

    with pytest.raises(UserError, match="no tokenizer for run 'typo'.*ssr finetune"):
        encode_latents(_recipe(tmp_path, name="typo"), setup_runtime("cpu", "fp32"))
    assert not (tmp_path / "typo" / "latents" / "manifest.json").exists()


# ---------------------------------------------------------------- the engine: non-finite steps, checkpoints


class Toy(nn.Module):
    """Least squares; a batch whose targets are NaN gives a NaN loss and NaN gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, batch, step_rng):
        x, y = batch
        return {"loss": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


def _toy(run_dir: Path, steps: int, *, nan_steps=(), schedule=None, **kw) -> TrainSpec:
    torch.manual_seed(0)
    model = Toy()
    xs = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    ys = xs.sum(-1)

    def batches(start: int):
        for step, idx in enumerate(StepSampler(16, 4, seed=0, start=start), start=start):
            i = torch.tensor([k for k, _ in idx])
            yield xs[i], ys[i] * (math.nan if step in nan_steps else 1.0)

    ema = EMA(model, 0.5)
    options = dict(ckpt_every=2, log_every=2, keep_last=10)
    options.update(kw)
    return TrainSpec(name="toy", model=model, param_groups=[ParamGroup("all", list(model.parameters()))],
                     batches=batches, steps=steps, lr=0.05, run_dir=run_dir, emas={"m": (ema, lambda: model)},
                     schedule=schedule or (lambda s: 1.0), seed=0, **options)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    rt = setup_runtime("cpu", "fp32")
    spec = _toy(tmp_path, 8, nan_steps={2, 5})
    train(spec, rt)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sum(r["skipped_steps"] for r in records) == 2
    assert all(math.isfinite(r["loss"]) for r in records)
    for _, path in Checkpointer(tmp_path / "checkpoints").list():
        state = load_checkpoint_file(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
        assert all(torch.isfinite(t).all() for t in state["ema"]["m"].values())


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    spec = _toy(tmp_path, 10, nan_steps=set(range(3, 10)), max_nonfinite_steps=3)
    with pytest.raises(DivergenceError, match="3 consecutive steps"):
        train(spec, setup_runtime("cpu", "fp32"))
    assert isinstance(DivergenceError("x"), UserError)  # exit 2, one line
    saved = Checkpointer(tmp_path / "checkpoints").list()
    assert [s for s, _ in saved] == [2, 4]  # step 4 follows one skipped step: finite weights
    assert all(torch.isfinite(t).all() for t in load_checkpoint_file(saved[-1][1])["model"].values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """An infinite LR at step 2 makes the weights infinite with finite gradients; checkpoints fall every 3 steps
    and the loss is logged every 5 (the old code wrote step 3's checkpoint with them)."""
    spec = _toy(tmp_path, 9, schedule=lambda s: math.inf if s == 2 else 1.0, ckpt_every=3, log_every=5)
    with pytest.raises(DivergenceError, match="non-finite"):
        train(spec, setup_runtime("cpu", "fp32"))
    assert Checkpointer(tmp_path / "checkpoints").list() == []


def _flip_inside_tensor(path: Path, marker: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(marker)
    assert at > 0
    data[at + 1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_detected_and_falls_back(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    value = torch.full((256,), 1.2345)
    ck.save(1, {"w": value})
    ck.save(2, {"w": value * 2})
    _flip_inside_tensor(ck.path_for(2), (value * 2)[:4].numpy().tobytes())
    with pytest.warns(UserWarning, match="checksum mismatch"):
        state = ck.load_latest()
    assert state["step"] == 1 and torch.equal(state["w"], value)


def test_keep_last_never_prunes_the_only_valid_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    w = torch.arange(64.0)
    ck.save(1, {"w": w})
    ck.save(2, {"w": w + 1})
    _flip_inside_tensor(ck.path_for(2), (w + 1)[8:12].numpy().tobytes())  # bit rot in 2
    ck.save(3, {"w": w + 2})
    _flip_inside_tensor(ck.path_for(3), (w + 2)[8:12].numpy().tobytes())  # and later in 3
    with pytest.warns(UserWarning):
        state = ck.load_latest()
    assert state is not None and state["step"] == 1 and torch.equal(state["w"], w)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(1, {"w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left.*step_00000001.pt"):
        ck.save(2, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert [s for s, _ in ck.list()] == [1] and not list(tmp_path.glob(".*tmp*"))
    assert torch.equal(ck.load_latest()["w"], torch.ones(3))
    assert isinstance(CheckpointWriteError("x"), UserError)


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_is_identical(tmp_path):
    rt = setup_runtime("cpu", "fp32")
    full = _toy(tmp_path / "full", 9, ckpt_every=100)
    train(full, rt)

    def term(step):  # the signal arrives during step 4's hooks: the run stops at the next boundary, step 5
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = _toy(tmp_path / "cut", 9, ckpt_every=100, hooks=[(1, term)])
    with pytest.raises(Preempted) as info:
        train(cut, rt)
    assert info.value.code == 0
    assert [s for s, _ in Checkpointer(tmp_path / "cut" / "checkpoints").list()] == [5]
    resumed = _toy(tmp_path / "cut", 9, ckpt_every=100)
    assert train(resumed, rt).resumed_from == 5
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))


@pytest.mark.slow  # a CLI process: ~10 s, mostly its start-up
def test_sigterm_to_the_cli_process_checkpoints_and_exits_0(tmp_path):
    """What a scheduler does: SIGTERM to `ssr finetune` mid-run. It writes a checkpoint at the next step
    boundary, says so, releases the run folder's lock and exits 0."""
    import time

    cfg = _recipe(tmp_path, name="term", train={"steps": 10_000, "ckpt_every_steps": 100_000, "log_every_steps": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-m", "ssr_cli", "finetune", str(_toml(tmp_path, cfg))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = cfg.run_dir() / "finetune" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)  # training (and its SIGTERM handler) is running once steps are logged
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    steps = [s for s, _ in Checkpointer(cfg.run_dir() / "finetune" / "checkpoints").list()]
    assert len(steps) == 1 and 2 <= steps[0] < 10_000
    assert f"SIGTERM: checkpoint written at step {steps[0]}" in " ".join(output.split())
    assert not (cfg.run_dir() / ".lock").exists()


def test_more_steps_continue_a_finished_run_on_the_new_schedule(tmp_path):
    """Raising the step count of a finished run continues it from its last checkpoint; the LR of the new steps
    is the schedule of the *new* length (a warmup_cosine decay is stretched over the new total, so the LR
    rises again after the old end), not a restart from step 0."""
    rt = setup_runtime("cpu", "fp32")

    def sched(total):
        return lr_lambda(schedule="warmup_cosine", total_steps=total, lr=0.05, lr_init=0.0, lr_min=0.001,
                         warmup_frac=0.25, cosine_frac=0.5)

    train(_toy(tmp_path, 8, schedule=sched(8), log_every=1), rt)
    more = _toy(tmp_path, 16, schedule=sched(16), log_every=1)
    assert train(more, rt).resumed_from == 8
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17))
    # lr logged after step s is the LR of step s (0-based) under the 16-step schedule
    for r in records[8:]:
        assert r["lr"] == pytest.approx(0.05 * sched(16)(r["step"]))
    assert records[8]["lr"] > records[7]["lr"]  # the decay restarts from the new schedule's value


# ---------------------------------------------------------------- run folder lock


def _toml(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(dump(cfg))
    return path


def test_a_second_writer_on_one_run_folder_is_refused(tmp_path):
    cfg = _recipe(tmp_path, name="locked")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg.run_dir().mkdir(parents=True)
        import socket

        (cfg.run_dir() / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        result = CliRunner().invoke(app, ["encode-latents", str(_toml(tmp_path, cfg))])
        assert result.exit_code == 2
        assert f"in use by PID {holder.pid}" in " ".join(result.output.split())
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over (the command then fails for its own reason).
    result = CliRunner().invoke(app, ["encode-latents", str(_toml(tmp_path, cfg))])
    assert "stale lock" in " ".join(result.output.split()) and "no tokenizer" in " ".join(result.output.split())
    assert not (cfg.run_dir() / ".lock").exists()  # released at exit


def test_a_lock_from_another_host_is_refused_and_kept(tmp_path):
    cfg = _recipe(tmp_path, name="remote")
    cfg.run_dir().mkdir(parents=True)
    lock = cfg.run_dir() / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid"}))  # a PID that cannot be checked from here
    result = CliRunner().invoke(app, ["encode-latents", str(_toml(tmp_path, cfg))], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "in use by PID 1 on host elsewhere.invalid" in result.output and "delete the lock file" in result.output
    assert json.loads(lock.read_text())["host"] == "elsewhere.invalid"  # not taken over


# ---------------------------------------------------------------- inputs


def test_a_16_bit_png_is_read_with_its_true_values(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 … 65535 in steps of 257
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        x = pil_to_tensor(img)
    expected = torch.from_numpy((ramp // 257).astype(np.float32)) / 127.5 - 1.0
    for c in range(3):
        torch.testing.assert_close(x[c], expected, rtol=0, atol=1e-6)


def test_a_garbage_safetensors_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "tok.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(UserError, match="tok.safetensors"):
        load_state_dict_file(path)


@pytest.mark.parametrize("override, key", [("run.seed=true", "run.seed"), ('train.steps="150"', "train.steps")])
def test_recipe_values_are_not_coerced(override, key, tmp_path):
    from ssr_cli.recipe import RecipeError, load

    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml", [override])


def test_derive_a_refuses_a_grid_whose_matrices_would_not_fit():
    result = CliRunner().invoke(app, ["derive-a", "--size", "200"])
    assert result.exit_code == 2 and "4096 channels" in " ".join(result.output.split())


def test_plain_progress_lines_when_the_output_is_not_a_terminal(tmp_path, capsys):
    train(_toy(tmp_path, 40, log_every=5), setup_runtime("cpu", "fp32"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("toy | ")]
    assert [line.split(" | ")[1] for line in lines] == [f"{s}/40" for s in range(2, 41, 2)]
    assert "loss " in lines[-1] and "it/s" in lines[-1] and "ETA" in lines[-1]


@pytest.mark.parametrize("override, message", [('regularizer.grid="8x8"', "regularizer.grid"),
                                               ('dit.model="DiT-Q/9"', "unknown DiT model")])
def test_dry_run_fails_where_the_run_would(override, message):
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
    result = CliRunner().invoke(app, ["pipeline", str(quickstart), "--dry-run", "--set", override])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_dry_run_of_sample_and_encode_latents_builds_the_models():
    quickstart = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
    result = CliRunner().invoke(app, ["sample", quickstart, "--dry-run", "--set", 'dit.model="DiT-Q/9"'])
    assert result.exit_code == 2 and "unknown DiT model" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["encode-latents", quickstart, "--dry-run"])
    assert result.exit_code == 0 and "dry run: built tokenizer" in result.output


def test_unreadable_images_warn_once_each_and_stop_above_the_fraction(tmp_path):
    import warnings

    from ssr_cli.stages.common import image_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * k, dtype=np.uint8)).save(folder / f"ok{k}.png")
    for k in range(2):
        (folder / f"bad{k}.png").write_bytes(b"not a png")
    cfg = _recipe(tmp_path, data={"source": "folder", "path": str(folder), "max_unreadable_fraction": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two data sets over the same files (e.g. training and its progress grids)
            ds = image_dataset(cfg, augment=False)
            assert [ds[(i, None)][1] for i in range(len(ds))] == [0] * 5  # bad ones replaced by readable ones
    assert sorted(str(w.message).split(":")[0] for w in caught if "unreadable image" in str(w.message)) == [
        f"skipping unreadable image {folder / 'bad0.png'}", f"skipping unreadable image {folder / 'bad1.png'}"]
    log = cfg.run_dir() / "unreadable_images.txt"
    assert len(log.read_text().splitlines()) == 2
    strict = _recipe(tmp_path, data={"source": "folder", "path": str(folder), "max_unreadable_fraction": 0.3})
    ds = image_dataset(strict, augment=False)
    with pytest.raises(UserError, match=r"2 of 5 images are unreadable.*unreadable_images\.txt"):
        for i in range(len(ds)):
            ds[(i, None)]


def test_unreadable_image_count_in_metrics(tmp_path):
    folder = tmp_path / "count_imgs"  # names of their own: each file is reported once per process
    folder.mkdir()
    for k in range(5):
        Image.fromarray(np.full((20, 20, 3), 40 * k, dtype=np.uint8)).save(folder / f"ok{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    cfg = _recipe(tmp_path / "run", data={"source": "folder", "path": str(folder), "max_unreadable_fraction": 0.5},
                  train={"steps": 3, "batch_size": 6})
    with pytest.warns(UserWarning, match="unreadable image"):
        run_finetune(cfg, setup_runtime("cpu", "fp32"))
    (metrics,) = cfg.run_dir().rglob("metrics.jsonl")
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["unreadable_images"] == 1  # every batch of 6 reads all six files, one of them broken
    from ssr_cli.stages.pipeline import summarize, summary_rows

    summary = summarize(cfg, {"finetune": "1 s"})
    assert summary["unreadable_images"] == 1
    assert ("unreadable images (skipped)", "1 (see unreadable_images.txt)") in summary_rows(summary)


# --- malicious pickles: every place a file is loaded refuses one that would run code --------------------------

class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists only if the loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Payload(marker)}, path)
    return path


def test_malicious_checkpoint_refused(tmp_path):
    import hashlib
    import io
    import pickle
    import warnings

    from ssr_cli.engine.checkpoint import MAGIC

    marker = tmp_path / "pwned"
    plain = _write_malicious(tmp_path / "step_00000001.pt", marker)
    buf = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buf)
    payload = buf.getvalue()  # a valid checksum over a malicious payload: the checksum alone must not admit it
    signed = tmp_path / "step_00000002.pt"
    signed.write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    for path in (plain, signed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(pickle.UnpicklingError):
                load_checkpoint_file(path)
    assert not marker.exists()


def test_malicious_tokenizer_weights_refused(tmp_path):
    from ssr_cli.models.weights import WeightsError

    marker = tmp_path / "pwned"
    path = _write_malicious(tmp_path / "tokenizer.pt", marker)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_malicious_dit_weights_refused(tmp_path):
    from ssr_cli.models.lightningdit import checkpoint_state, read_stats
    from ssr_cli.models.weights import WeightsError

    marker = tmp_path / "pwned"
    weights = _write_malicious(tmp_path / "dit.pt", marker)
    stats = _write_malicious(tmp_path / "latents_stats.pt", marker)
    with pytest.raises(WeightsError, match="weights_only=True"):
        checkpoint_state(weights)
    with pytest.raises(WeightsError, match="unreadable"):
        read_stats(stats)
    assert not marker.exists()


def test_malicious_latent_shard_refused(tmp_path):
    from safetensors import SafetensorError

    from ssr_cli.latent_cache import STATS, read_manifest
    from ssr_cli.models.weights import WeightsError

    marker = tmp_path / "pwned"
    _write_malicious(tmp_path / "shard_00000.safetensors", marker)  # a pickle under a shard's name
    torch.save({"mean": torch.zeros(4), "std": torch.ones(4)}, tmp_path / STATS)
    with pytest.raises(WeightsError, match="cannot be read as safetensors"):  # one user-error line, no traceback
        read_manifest(tmp_path)
    with pytest.raises(SafetensorError):
        load_file(str(tmp_path / "shard_00000.safetensors"))
    assert not marker.exists()


def test_malicious_reference_npz_refused(tmp_path):
    from ssr_cli.metrics import load_reference

    marker = tmp_path / "pwned"
    obj = np.empty(1, dtype=object)
    obj[0] = _Payload(marker)
    path = tmp_path / "ref.npz"
    np.savez(path, mu=obj, sigma=np.eye(2))  # np.savez pickles object arrays
    assert not marker.exists()
    with pytest.raises(ValueError, match="allow_pickle"):
        load_reference(path)
    assert not marker.exists()


# --- the same through the CLI: exit 2, one error line, no traceback, the payload never runs ---------------------

CLI_ENV = {"COLUMNS": "400", "NO_COLOR": "1"}  # wide: rich must not wrap the one line


def _cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env=CLI_ENV)


def _refused_in_one_line(result, marker: Path, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not any(line.startswith((" ", "\t")) for line in result.stderr.splitlines()
                   if line.strip() and "warnings.warn" not in line), result.stderr  # nothing continues it
    for text in expected:
        assert text in errors[0], errors[0]
    assert not marker.exists()  # the pickled code never ran
    return errors[0]


def _signed(path: Path, marker: Path) -> Path:
    """A malicious payload behind a valid ssr checksum header: the checksum alone must not admit it."""
    import hashlib
    import io

    from ssr_cli.engine.checkpoint import MAGIC

    buf = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buf)
    path.write_bytes(MAGIC + hashlib.sha256(buf.getvalue()).digest() + buf.getvalue())
    return path


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "valid-checksum"])
def test_cli_refuses_a_malicious_checkpoint(tmp_path, signed):
    marker = tmp_path / "pwned"
    cfg = _recipe(tmp_path, name="ck", train={"steps": 2})
    ckpts = cfg.run_dir() / "finetune" / "checkpoints"
    ckpts.mkdir(parents=True)
    (_signed if signed else _write_malicious)(ckpts / "step_00000001.pt", marker)
    line = _refused_in_one_line(_cli("finetune", _toml(tmp_path, cfg)), marker,
                                "step_00000001.pt holds pickled code", "Unsupported global", "delete it")
    assert "weights_only=False" not in line  # torch's advice to load it unsafely is not passed on
    assert (ckpts / "step_00000001.pt").exists()  # neither used nor pruned


def test_cli_refuses_malicious_tokenizer_weights(tmp_path):
    marker = tmp_path / "pwned"
    cfg = _recipe(tmp_path, name="tok", tokenizer={"weights": str(_write_malicious(tmp_path / "tok.pt", marker))})
    _refused_in_one_line(_cli("encode-latents", _toml(tmp_path, cfg)), marker,
                         "tok.pt: expected a plain tensor checkpoint", "Unsupported global")
    own = _recipe(tmp_path, name="own", eval={"generation": False})  # the run's fine-tuned tokenizer, a pickle
    own.run_dir().mkdir(parents=True)
    _write_malicious(own.run_dir() / "tokenizer.safetensors", marker)
    _refused_in_one_line(_cli("evaluate", _toml(tmp_path, own)), marker,
                         "tokenizer.safetensors: expected", "cannot be read as safetensors")


def test_cli_refuses_malicious_dit_weights(tmp_path):
    from ssr_cli.stages.common import CONFIG_FILE, DIT_DIR, EMA_FILE, dit_kwargs

    marker = tmp_path / "pwned"
    cfg = _recipe(tmp_path, name="dit")
    toml = _toml(tmp_path, cfg)
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, stats)
    evil = _write_malicious(tmp_path / "lightningdit.pt", marker)
    _refused_in_one_line(_cli("import-dit", evil, toml, "--stats", stats), marker,
                         "lightningdit.pt: expected a LightningDiT .pt", "Unsupported global")
    # A trained run whose EMA weights file was replaced by a pickle: `ssr sample` refuses it.
    dit = cfg.run_dir() / DIT_DIR
    dit.mkdir(parents=True)
    (dit / CONFIG_FILE).write_text(json.dumps(dit_kwargs(cfg, {"latent_shape": [16, 4, 4], "num_classes": 1})))
    _write_malicious(dit / EMA_FILE, marker)
    _refused_in_one_line(_cli("sample", toml), marker, f"{EMA_FILE}: expected the DiT's EMA weights",
                         "cannot be read as safetensors")


@pytest.mark.parametrize("layout", ["ssr", "lightningdit", "stats"])
def test_cli_refuses_a_malicious_latent_shard(tmp_path, layout):
    from ssr_cli.latent_cache import MANIFEST, STATS
    from ssr_cli.models.lightningdit import write_stats

    marker = tmp_path / "pwned"
    cfg = _recipe(tmp_path, name="lat")
    folder = cfg.run_dir() / "latents"
    folder.mkdir(parents=True)
    shard = folder / "shard_00000.safetensors"
    if layout == "stats":  # a valid shard, and a pickle as the statistics file
        from safetensors.torch import save_file

        save_file({"latents": torch.zeros(8, 16, 4, 4), "labels": torch.zeros(8, dtype=torch.int64)}, str(shard))
        _write_malicious(folder / STATS, marker)
        expected = (f"{STATS}: expected LightningDiT's latents_stats.pt", "Unsupported global")
    else:
        _write_malicious(shard, marker)
        write_stats(folder / STATS, torch.zeros(16), torch.ones(16))
        expected = ("shard_00000.safetensors: expected", "cannot be read as safetensors")
    if layout != "lightningdit":  # ssr's own cache: a manifest naming the shard
        (folder / MANIFEST).write_text(json.dumps({
            "tokenizer": None, "num_images": 8, "latent_shape": [16, 4, 4], "posterior": "mean",
            "flip_copies": False, "classes": [], "num_classes": 1, "shards": [shard.name], "stats": {"file": STATS}}))
    _refused_in_one_line(_cli("train-dit", _toml(tmp_path, cfg)), marker, *expected)


def test_cli_refuses_malicious_reference_statistics(tmp_path, shared_data):
    inception = shared_data / "inception" / "pt_inception-2015-12-05-reconstructed-nofc.pth"
    if not inception.is_file():
        pytest.skip(f"Inception weights not found at {inception}")
    marker = tmp_path / "pwned"
    obj = np.empty(1, dtype=object)
    obj[0] = _Payload(marker)
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=obj, sigma=np.eye(2))  # np.savez pickles object arrays
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 16, 16, 3), dtype=np.uint8))
    cfg = _recipe(tmp_path, name="ref", eval={"reconstruction": False, "reference": str(reference),
                                              "inception_weights": str(inception)})
    _refused_in_one_line(_cli("evaluate", _toml(tmp_path, cfg), "--gfid", "--samples", samples), marker,
                         "ref.npz: not a reference batch of plain arrays", "allow_pickle=False")
