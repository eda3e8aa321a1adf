"""Recipe → engine glue shared by every trainer that reads ``[data]`` and ``[train]``.

``finetune`` (pretrain and fine-tune stages), the from-scratch VAEs and the denoiser all train images
from the recipe's data set with the recipe's optimiser, schedule and checkpoint settings; only the
task, its parameter groups and its hooks differ. :func:`image_dataset` and :func:`train_spec` hold what
they share, so a new ``[train]`` knob reaches all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ssr_cli.data import batch_source, build_dataset
from ssr_cli.engine import TrainSpec, lr_lambda
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.runtime import Runtime
from ssr_cli.recipe import Recipe, dump


@contextmanager
def fixed_seed(seed: int) -> Iterator[None]:
    """Run the block with torch's RNGs seeded by ``seed``, restoring their previous state afterwards (a model
    built inside starts from weights that depend on ``seed`` alone, not on what ran before)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def image_dataset(cfg: Recipe, *, augment: bool = True, image_size: int | None = None):
    """The recipe's images ([data]) at ``image_size`` (None: data.image_size); ``augment=False`` drops random
    crops and flips (what encoding, evaluation and probing read)."""
    d = cfg.data
    extra = {"random_crop": d.random_crop, "random_flip": d.random_flip} if augment else {}
    return build_dataset(d.source, path=d.path, split=d.split, image_size=image_size or d.image_size,
                         resize=d.resize, max_images=d.max_images, builtin_crops=d.builtin_crops, seed=cfg.run.seed,
                         max_unreadable_fraction=d.max_unreadable_fraction,
                         unreadable_log=cfg.run_dir() / "unreadable_images.txt", **extra)


def fixed_images(cfg: Recipe, n: int) -> torch.Tensor:
    """``n`` images spread evenly over the data set, without augmentation: the rows of progress grids."""
    ds = image_dataset(cfg, augment=False)
    picks = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().tolist()
    return torch.stack([ds[(i, None)][0] for i in picks])


def train_spec(cfg: Recipe, rt: Runtime, *, name: str, model: nn.Module, param_groups: list[ParamGroup], dataset,
               run_dir: Path, steps: int | None = None, lr: float | None = None, constant_lr: bool = False,
               seed: int | None = None, **extra) -> TrainSpec:
    """A :class:`TrainSpec` from ``[train]`` (batch, accumulation, optimiser, schedule, clipping, checkpoints,
    logging) and ``[run]`` (seed, compile); ``steps``/``lr`` override ``train.steps``/``train.lr`` (the
    pretraining stage), ``constant_lr`` replaces the schedule; ``extra`` goes to TrainSpec (emas, hooks, …)."""
    t = cfg.train
    world_batch = rt.world_size * t.grad_accum
    if t.batch_size % world_batch:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by ranks × train.grad_accum ({world_batch})")
    steps = t.steps if steps is None else steps
    lr = t.lr if lr is None else lr
    return TrainSpec(
        name=name,
        model=model,
        param_groups=param_groups,
        batches=batch_source(dataset, batch_per_rank=t.batch_size // world_batch, grad_accum=t.grad_accum,
                             seed=cfg.run.seed, rank=rt.rank, world_size=rt.world_size, num_workers=cfg.data.num_workers),
        steps=steps,
        lr=lr,
        run_dir=run_dir,
        schedule=lr_lambda(schedule="constant" if constant_lr else t.schedule, total_steps=steps, lr=lr,
                           lr_init=t.lr_init, lr_min=t.lr_min, warmup_frac=t.warmup_frac, cosine_frac=t.cosine_frac),
        betas=t.betas,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip or None,
        grad_accum=t.grad_accum,
        ckpt_every=t.ckpt_every_steps,
        keep_last=t.keep_last,
        log_every=t.log_every_steps,
        max_nonfinite_steps=t.max_nonfinite_steps,
        seed=cfg.run.seed if seed is None else seed,
        recipe_text=dump(cfg),
        compile=cfg.run.compile,
        images_per_step=t.batch_size,
        readings={"unreadable_images": lambda: unreadable_count(dataset.bad_log)} if getattr(dataset, "bad_log", None)
        else {},
        **extra,
    )


def unreadable_count(log: Path | None) -> int:
    """How many distinct images ``log`` (``<run>/unreadable_images.txt``, appended by every worker and rank)
    lists as unreadable; 0 when it does not exist."""
    if log is None or not Path(log).is_file():
        return 0
    return len({line.split("\t", 1)[0] for line in Path(log).read_text().splitlines() if line})
