"""Tokenizer fine-tuning with a regularizer (``ssr finetune``), on the shared engine.

Stages, each resumable in its own folder of the run:
  pretrain/  plain reconstruction training from scratch (only when ``train.pretrain_steps`` > 0,
             e.g. the quickstart, which has no pretrained tokenizer to start from);
  finetune/  reconstruction + the chosen regularizer (ssr, eq_vae, scale or none).
The fine-tuned tokenizer is exported to ``<run>/tokenizer.safetensors`` in its original key layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssr_cli.blur import gaussian_blur
from ssr_cli.dynamics import save_dynamics
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.ema import EMA
from ssr_cli.engine.loop import train
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console
from ssr_cli.engine.runtime import Runtime
from ssr_cli.images import save_grid
from ssr_cli.inputs import file_sha256, refresh, settings
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import Recipe
from ssr_cli.regularizers import build
from ssr_cli.stages.common import (
    DYNAMICS_NAME,
    EXPORT_NAME,
    build_tokenizer,
    finetuned_weights,
    fixed_images,
    image_dataset,
    make_lpips,
    read_json,
    require_lpips_weights,
    train_spec,
)


class FinetuneTask(nn.Module):
    """What the engine trains: the tokenizer and the regularizer's own parameters (A, Δ)."""

    def __init__(self, tokenizer: nn.Module, regularizer: nn.Module, target: EMA | None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.regularizer = regularizer
        self._target = target  # an EMA, deliberately not a sub-module: never trained, not in DDP

    def target_encoder(self, images: torch.Tensor) -> torch.Tensor:
        return self._target.shadow.encode_latent(images)

    def forward(self, batch, step_rng: torch.Generator) -> dict[str, torch.Tensor]:
        images = batch[0]
        target = self.target_encoder if self._target is not None else None
        return self.regularizer.loss(self.tokenizer, images, step_rng=step_rng, target_encoder=target)


@torch.no_grad()
def reconstruction_grid(task: FinetuneTask, images: torch.Tensor, path: Path, tau_max: float, delta_tau: float) -> Path:
    """Rows: input, reconstruction, blurred pair I(τ1), I(τ2), and — for SSR — the decoded prediction D(ẑ2)."""
    tok = task.tokenizer
    device = next(tok.parameters()).device
    x = images.to(device)
    tau1 = 0.25 * (tau_max - delta_tau)
    x1, x2 = gaussian_blur(x, tau1), gaussian_blur(x, tau1 + delta_tau)
    rows = [x, tok.decode(tok.encode_latent(x)), x1, x2]
    labels = ["input", "recon", f"blur t={tau1:.1f}", f"blur t={tau1 + delta_tau:.1f}"]
    dynamics = getattr(task.regularizer, "dynamics", None)
    if dynamics is not None:
        rows.append(tok.decode(task.regularizer.predict_scaled(tok, tok.encode_latent(x1))))
        labels.append("D(A z1)")
    return save_grid([r.clamp(-1, 1).cpu() for r in rows], path, row_labels=labels)


def _param_groups(task: FinetuneTask, a_lr_mult: float) -> list[ParamGroup]:
    reg_params = [p for p in task.regularizer.parameters() if p.requires_grad]
    groups = [ParamGroup("tokenizer", [p for p in task.tokenizer.parameters() if p.requires_grad])]
    if reg_params:
        groups.append(ParamGroup("ssr", reg_params, lr_mult=a_lr_mult, weight_decay=0.0))
    return groups


def _stage(cfg: Recipe, rt: Runtime, tokenizer, *, name: str, kind: str, steps: int, lr: float, constant_lr: bool,
           run_dir: Path) -> None:
    t = cfg.train
    lpips_weight = max(cfg.loss.lambda_lpips, cfg.regularizer.lambda_pred_lpips if kind == "ssr" else 0.0)
    lpips_fn = make_lpips(cfg, lpips_weight, rt.device)
    regularizer = build(cfg.regularizer, cfg.loss, kind=kind, latent_channels=tokenizer.latent_channels,
                        image_size=cfg.data.image_size, seed=cfg.run.seed, lpips_fn=lpips_fn)
    target = EMA(tokenizer.to(rt.device), cfg.regularizer.ema_decay) if kind == "ssr" else None
    task = FinetuneTask(tokenizer, regularizer, target)
    if rt.is_main and hasattr(regularizer, "dynamics"):
        r = cfg.regularizer
        source = (f"blur gap {r.delta_tau:g} px² at {cfg.data.image_size} px" if r.delta_source == "blur_gap"
                  else "regularizer.delta_init")
        console.print(f"{name}: SSR Δ starts at {float(regularizer.dynamics.delta_start):.6g} ({source}; "
                      f"A {r.basis}, a_normalization {r.a_normalization}, {regularizer.dynamics.discretization})")
    emas = {"target": (target, lambda: task.tokenizer)} if target is not None else {}
    fixed = fixed_images(cfg, 4)
    spec = train_spec(
        cfg, rt, name=name, model=task, dataset=image_dataset(cfg), run_dir=run_dir, steps=steps, lr=lr,
        constant_lr=constant_lr, seed=cfg.run.seed + (0 if name == "finetune" else 1),
        param_groups=_param_groups(task, cfg.regularizer.a_lr_mult if cfg.regularizer.learn_a else 0.0),
        emas=emas,
        hooks=[(t.image_every_steps, lambda step: reconstruction_grid(
            task, fixed, run_dir / "images" / f"step_{step:08d}.png", cfg.regularizer.tau_max, cfg.regularizer.delta_tau))],
        find_unused_parameters=True,
    )
    train(spec, rt)
    if rt.is_main and hasattr(regularizer, "dynamics"):
        save_dynamics(regularizer.dynamics, run_dir / DYNAMICS_NAME)


FINETUNE_KEY = ".finetune_inputs.json"


def finetune_inputs(cfg: Recipe) -> dict:
    """What the (pre)trained tokenizer depends on: the starting weights' SHA-256, the tokenizer, regularizer,
    loss, data and training settings and the seed (not ``train.steps``: more steps extend a run)."""
    # A pretrain-only run (train.steps = 0) never uses the regularizer: its settings do not shape the output.
    regularizer = settings(cfg.regularizer) if cfg.train.steps else None
    return {"start": file_sha256(cfg.tokenizer.weights), "tokenizer": settings(cfg.tokenizer, "weights"),
            "regularizer": regularizer, "loss": settings(cfg.loss), "seed": cfg.run.seed,
            "data": settings(cfg.data, "num_workers", "max_unreadable_fraction"),
            "train": settings(cfg.train, "steps", "ckpt_every_steps", "keep_last", "log_every_steps",
                              "image_every_steps", "max_nonfinite_steps")}


def run_finetune(cfg: Recipe, rt: Runtime) -> Path:
    """Pretrain (optional) then fine-tune; export the tokenizer. Returns the exported weights' path. Checkpoints
    made with other inputs (:func:`finetune_inputs`) are discarded, with a message, and the stage is redone."""
    run_dir = cfg.run_dir()
    if rt.is_main:
        refresh(run_dir / FINETUNE_KEY, finetune_inputs(cfg),
                [run_dir / "pretrain", run_dir / "finetune", finetuned_weights(cfg)], "finetune", console)
    rt.barrier()
    tokenizer = build_tokenizer(cfg)
    # Fail on a regularizer that cannot fit this tokenizer before any (pre)training time is spent.
    build(cfg.regularizer, cfg.loss, latent_channels=tokenizer.latent_channels, image_size=cfg.data.image_size,
          seed=cfg.run.seed)
    require_lpips_weights(cfg, max(cfg.loss.lambda_lpips,
                                   cfg.regularizer.lambda_pred_lpips if cfg.regularizer.kind == "ssr" else 0.0))
    if cfg.train.pretrain_steps:
        _stage(cfg, rt, tokenizer, name="pretrain", kind="none", steps=cfg.train.pretrain_steps,
               lr=cfg.train.pretrain_lr, constant_lr=True,
               run_dir=run_dir / "pretrain")
        if rt.is_main:
            save_weights(tokenizer, run_dir / "pretrain" / EXPORT_NAME)
            console.print(f"pretrained tokenizer written to {run_dir / 'pretrain' / EXPORT_NAME}")
    if not cfg.train.steps:
        return _export(cfg, rt, tokenizer)
    frozen = tokenizer.frozen_blocks(cfg.tokenizer.frozen_encoder_blocks, cfg.tokenizer.frozen_decoder_blocks)
    if rt.is_main:
        console.print(f"finetune: froze {len(frozen)} parameter tensors "
                      f"(first {cfg.tokenizer.frozen_encoder_blocks} encoder / last {cfg.tokenizer.frozen_decoder_blocks} decoder stages)")
    _stage(cfg, rt, tokenizer, name="finetune", kind=cfg.regularizer.kind, steps=cfg.train.steps, lr=cfg.train.lr,
           constant_lr=False,
           run_dir=run_dir / "finetune")
    return _export(cfg, rt, tokenizer)


def _export(cfg: Recipe, rt: Runtime, tokenizer) -> Path:
    out = finetuned_weights(cfg)
    if rt.is_main:
        save_weights(tokenizer, out)
        console.print(f"[green]{'fine-tuned' if cfg.train.steps else 'pretrained'} tokenizer written to {out}")
    rt.barrier()
    return out


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "finetune"
PIPELINE_RECORD = False
"""This stage keeps its own record (``FINETUNE_KEY``, written before it trains) instead of the pipeline's."""


def inputs(cfg: Recipe) -> dict:
    return finetune_inputs(cfg)


def is_complete(cfg: Recipe) -> bool:
    """The tokenizer is exported, the last stage's checkpoints reached its steps, and the recorded inputs are
    today's."""
    folder = cfg.run_dir()
    stage_dir, steps = ("finetune", cfg.train.steps) if cfg.train.steps else ("pretrain", cfg.train.pretrain_steps)
    done = Checkpointer(folder / stage_dir / "checkpoints").list()
    return (finetuned_weights(cfg).is_file() and bool(done) and done[-1][0] >= steps
            and read_json(folder / FINETUNE_KEY) == finetune_inputs(cfg))


def run(cfg: Recipe, rt: Runtime) -> Path:
    return run_finetune(cfg, rt)
