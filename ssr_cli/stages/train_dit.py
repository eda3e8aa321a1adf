"""``ssr train-dit``: a LightningDiT trained with rectified flow on the cached latents.

The DiT sees normalised latents x = (z − mean) / std with the per-channel statistics of the cache. Outputs
live in ``<run>/dit/``: checkpoints, metrics, ``dit_ema.safetensors``, ``dit_config.json`` and the statistics
(``latent_stats.safetensors``) that travel with the weights.
"""

from __future__ import annotations

from pathlib import Path

from ssr_cli.data import batch_source
from ssr_cli.engine import EMA, TrainSpec, train
from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.errors import UserValueError
from ssr_cli.inputs import refresh, settings
from ssr_cli.latent_cache import LatentShards, latents_dir, latents_fingerprint, load_stats, read_manifest
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import Recipe, dump
from ssr_cli.stages.common import (
    CONFIG_FILE,
    DIT_DIR,
    EMA_FILE,
    STATS_FILE,
    DiTTask,
    build_dit_from,
    dit_kwargs,
    fixed_seed,
    optimisation,
    recorded,
)


def dit_inputs(cfg: Recipe) -> dict:
    """What the DiT's training depends on (more steps continue a run; other latents or settings restart it)."""
    return {"latents": latents_fingerprint(latents_dir(cfg)), "seed": cfg.run.seed,
            "dit": settings(cfg.dit, "steps", "ckpt_every_steps", "keep_last", "log_every_steps", "max_nonfinite_steps")}


def run_train_dit(cfg: Recipe, rt: Runtime) -> Path:
    lat_dir = latents_dir(cfg)
    manifest = read_manifest(lat_dir)
    mean, std = load_stats(lat_dir)
    kwargs = dit_kwargs(cfg, manifest)
    with fixed_seed(step_seed(cfg.run.seed, "dit-init")):  # the starting weights depend on run.seed alone
        model = build_dit_from(kwargs)
    task = DiTTask(model, mean, std, cosine_weight=1.0 if cfg.dit.cosine_loss else 0.0,
                   t_mean=cfg.dit.t_mean, t_std=cfg.dit.t_std)
    ema = EMA(model, cfg.dit.ema_decay)
    dataset = LatentShards(lat_dir, random_flip=True)
    d = cfg.dit
    if d.batch_size % rt.world_size:
        raise UserValueError(f"dit.batch_size ({d.batch_size}) must be divisible by the number of ranks "
                             f"({rt.world_size})")
    out = cfg.run_dir() / DIT_DIR
    if rt.is_main:  # checkpoints of a DiT trained on other latents or settings are not resumed from
        refresh(out / ".inputs.json", dit_inputs(cfg), [out / "checkpoints", out / "metrics.jsonl", out / EMA_FILE,
                                                       out / CONFIG_FILE, out / "curves.png"], "train-dit", console)
    rt.barrier()
    n_params = sum(p.numel() for p in model.parameters())
    if rt.is_main:
        console.print(f"train-dit: {kwargs['name']} ({n_params / 1e6:.2f}M parameters) on {len(dataset)} latents "
                      f"{tuple(manifest['latent_shape'])}, {kwargs['num_classes']} classes")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    spec = TrainSpec(
        name="train-dit",
        model=task,
        param_groups=[ParamGroup("weights", decay), ParamGroup("norms_biases_embeddings", no_decay, weight_decay=0.0)],
        batches=batch_source(dataset, batch_per_rank=d.batch_size // rt.world_size, grad_accum=1, seed=cfg.run.seed,
                             rank=rt.rank, world_size=rt.world_size),
        run_dir=out,
        emas={"dit": (ema, lambda: model)},
        **optimisation(d),
        seed=step_seed(cfg.run.seed, "dit"),
        recipe_text=dump(cfg),
        compile=cfg.run.compile,
        images_per_step=d.batch_size,
    )
    train(spec, rt)
    if rt.is_main:
        # Config first, weights last: the EMA file's presence is what marks the stage complete.
        write_json_atomic(out / CONFIG_FILE, {**kwargs, "latents": str(lat_dir)}, indent=2)
        save_weights({"mean": mean, "std": std}, out / STATS_FILE)
        save_weights(ema.shadow, out / EMA_FILE)
        console.print(f"[green]DiT EMA weights written to {out / EMA_FILE}")
    rt.barrier()
    return out / EMA_FILE


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "train-dit"
PIPELINE_RECORD = True


def inputs(cfg: Recipe) -> dict:
    return {**dit_inputs(cfg), "steps": cfg.dit.steps}


def is_complete(cfg: Recipe) -> bool:
    out = cfg.run_dir() / DIT_DIR
    done = Checkpointer(out / "checkpoints").list()
    present = (out / EMA_FILE).is_file() and bool(done) and done[-1][0] >= cfg.dit.steps
    return present and recorded(cfg, NAME) == inputs(cfg)


def run(cfg: Recipe, rt: Runtime) -> Path:
    return run_train_dit(cfg, rt)
