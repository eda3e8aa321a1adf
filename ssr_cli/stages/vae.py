"""From-scratch training of the vector-latent VAEs of blog ``002`` (S4D-VAE and its CNN-VAE baseline).

``ssr finetune`` dispatches here when ``tokenizer.family`` is "s4d-vae" or "cnn-vae". One stage on the
shared engine, resumable, in ``<run>/vae/``: checkpoints/, metrics.jsonl (nelbo, rec, kl, kl_weight,
collapsed_dims, collapse_alarm, ...) and images/ (prior samples and reconstructions as PNG grids every
``train.image_every_steps`` and at the end). The trained VAE is exported to ``<run>/tokenizer.safetensors``
(:func:`ssr_cli.stages.common.finetuned_weights`), where ``load_tokenizer_for_run`` and the rest of the toolkit
find it. :func:`ssr_cli.stages.evaluate.evaluate_vae` gives reconstruction PSNR/SSIM, the NELBO on held-out images
and, with Inception weights, the FID of prior samples against the data images.

Step-dependent state lives in buffers of the task module, so a resumed run repeats an uninterrupted one
bit for bit: the micro-batch counter (the KL weight schedule is a function of the step) and the collapse
alarm's counters (updated on rank 0 from the per-dimension KL, under no_grad; no random numbers drawn).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssr_cli.engine.loop import train
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.errors import UserValueError
from ssr_cli.images import save_grid
from ssr_cli.models.registry import VECTOR_VAE_FAMILIES as VAE_FAMILIES
from ssr_cli.models.s4d import s4d_param_groups
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    build_tokenizer,
    finetuned_weights,
    fixed_images,
    fixed_seed,
    image_dataset,
    is_vae_family,
    train_spec,
)
from ssr_cli.vae_objective import PosteriorCollapseAlarm, kl_weight_schedule, nelbo
from ssr_cli.engine.checkpoint import Checkpointer

STAGE_DIR = "vae"


def build_vae(cfg: Recipe) -> nn.Module:
    """The recipe's VAE, initialised from a seed derived from ``run.seed`` (or loaded from tokenizer.weights)."""
    if not is_vae_family(cfg):
        raise UserValueError(f"tokenizer.family = {cfg.tokenizer.family!r} is not a from-scratch VAE; "
                             f"choose one of {', '.join(VAE_FAMILIES)}")
    with fixed_seed(step_seed(cfg.run.seed, "vae-init")):
        return build_tokenizer(cfg)


def collapse_alarm_for(cfg: Recipe):
    v = cfg.vae
    grace = v.kl_warmup_steps if v.collapse_grace_steps is None else v.collapse_grace_steps
    if v.kl_schedule == "none" and v.collapse_grace_steps is None:
        grace = 0
    return PosteriorCollapseAlarm(threshold_nats_per_dim=v.collapse_threshold, patience_steps=v.collapse_patience,
                                  collapsed_fraction=v.collapse_fraction, grace_steps=grace)


def kl_weight_at(cfg: Recipe, step: int) -> float:
    """The KL weight β of ``[vae]`` at a (0-based) step."""
    v = cfg.vae
    return kl_weight_schedule(step, v.kl_schedule, warmup_steps=v.kl_warmup_steps, max_weight=v.kl_max_weight,
                              start_weight=v.kl_start_weight, cycle_steps=v.kl_cycle_steps,
                              ramp_fraction=v.kl_ramp_fraction)


class VAETask(nn.Module):
    """What the engine trains: ``forward(batch, step_rng)`` = the NELBO terms at the scheduled KL weight.

    Buffers (saved with the checkpoint, so resume is exact): ``micro_steps`` (micro-batches seen) and
    ``alarm_state`` = (updates, streak, fired) of the collapse alarm. ``watch`` (rank 0) updates the alarm
    once per optimizer step from the micro-batch-mean per-dimension KL and warns in red when it fires.
    """

    def __init__(self, vae: nn.Module, cfg: Recipe, *, grad_accum: int = 1, watch: bool = True) -> None:
        super().__init__()
        self.vae = vae
        self.cfg = cfg
        self.grad_accum = grad_accum
        self.watch = watch
        self.alarm = collapse_alarm_for(cfg)
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("alarm_state", torch.zeros(3, dtype=torch.int64))
        self._kl_sum: torch.Tensor | None = None

    def forward(self, batch, step_rng: torch.Generator) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        micro = int(self.micro_steps)
        step = micro // self.grad_accum
        beta = kl_weight_at(self.cfg, step)
        terms = nelbo(self.vae, images, kl_weight=beta)
        per_dim = terms.pop("kl_per_dim")
        with torch.no_grad():
            self.micro_steps += 1
            collapsed = (per_dim.detach() < self.alarm.threshold).sum().float()
            firing = self._watch(per_dim.detach(), last_micro=(micro + 1) % self.grad_accum == 0, step=step)
        ref = terms["loss"]
        terms["kl_weight"] = torch.tensor(beta, device=ref.device)
        terms["collapsed_dims"] = collapsed
        terms["collapse_alarm"] = torch.tensor(float(firing), device=ref.device)
        return terms

    def _watch(self, per_dim: torch.Tensor, *, last_micro: bool, step: int) -> bool:
        """Feed the alarm once per optimizer step (rank 0); True while it fires."""
        if not self.watch:
            return False
        self._kl_sum = per_dim.float().cpu() if self._kl_sum is None else self._kl_sum + per_dim.float().cpu()
        if not last_micro:
            return bool(self.alarm_state[2])
        mean_kl, self._kl_sum = self._kl_sum / self.grad_accum, None
        alarm = self.alarm
        alarm.updates, alarm.streak, alarm.fired = (int(v) for v in self.alarm_state.tolist())
        alarm.fired = bool(alarm.fired)
        was_fired = alarm.fired
        firing = alarm.update(mean_kl)  # logs an ERROR and warns (PosteriorCollapseWarning) when it fires
        if alarm.fired and not was_fired:  # and in red on the console, every episode
            console.print(f"[bold red]step {step + 1}: {alarm.message}[/]", highlight=False)
        self.alarm_state.copy_(torch.tensor([alarm.updates, alarm.streak, int(alarm.fired)]))
        return firing


@torch.no_grad()
def save_vae_grids(vae: nn.Module, images: torch.Tensor, out_dir: Path, tag: str, *, num_prior: int,
                   seed: int) -> tuple[Path, Path]:
    """Two PNG grids: ``recon_<tag>.png`` (rows: input, reconstruction from the posterior mean) and
    ``prior_<tag>.png`` (``num_prior`` decodings of z ~ N(0, I), 8 per row, a fixed seed so steps compare)."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    x = images.to(device)
    recon = vae.decode(vae.encode(x).mean).float().clamp(-1, 1)
    recon_path = save_grid([x.cpu(), recon.cpu()], out_dir / f"recon_{tag}.png", row_labels=["input", "recon"])
    gen = torch.Generator().manual_seed(step_seed(seed, "prior-grid"))
    samples = vae.sample_prior(num_prior, generator=gen).float().cpu()
    rows = [samples[i:i + 8] for i in range(0, num_prior, 8)]
    prior_path = save_grid(rows, out_dir / f"prior_{tag}.png")
    vae.train(was_training)
    return recon_path, prior_path


def _param_groups(vae: nn.Module, lr: float, ssm_lr: float) -> list[ParamGroup]:
    groups = []
    for g in s4d_param_groups(vae, base_lr=lr, ssm_lr=ssm_lr):
        wd = None if g["name"] == "main" else 0.0  # main: train.weight_decay; SSM (A, Δ): none
        groups.append(ParamGroup(g["name"], g["params"], lr_mult=g["lr_mult"], weight_decay=wd))
    return groups


def run_vae_train(cfg: Recipe, rt: Runtime, *, model: nn.Module | None = None) -> Path:
    """Train the recipe's S4D-VAE / CNN-VAE from scratch; export it; return the exported weights' path.

    ``model``: train this VAE instead of :func:`build_vae`'s (same interface; e.g. a variant under test).
    """
    t, d = cfg.train, cfg.data
    vae = build_vae(cfg) if model is None else model
    if getattr(vae, "image_size", d.image_size) != d.image_size:
        raise UserValueError(f"data.image_size = {d.image_size} but the {cfg.tokenizer.family}/{cfg.tokenizer.size} "
                             f"VAE is built for {vae.image_size}×{vae.image_size} images: set data.image_size = "
                             f"{vae.image_size} or tokenizer.overrides = {{ image_size = {d.image_size} }}")
    run_dir = cfg.run_dir()
    stage = run_dir / STAGE_DIR
    task = VAETask(vae, cfg, grad_accum=t.grad_accum, watch=rt.is_main)
    dataset = image_dataset(cfg)
    fixed = fixed_images(cfg, cfg.vae.grid_images)
    grids = lambda step: save_vae_grids(task.vae, fixed, stage / "images", f"step_{step:08d}",  # noqa: E731
                                        num_prior=cfg.vae.num_prior_samples, seed=cfg.run.seed)
    spec = train_spec(
        cfg, rt, name=f"vae ({cfg.tokenizer.family})", model=task, dataset=dataset, run_dir=stage,
        param_groups=_param_groups(vae, t.lr, cfg.vae.ssm_lr),
        hooks=[(t.image_every_steps, grids)],
    )
    train(spec, rt)
    out = finetuned_weights(cfg)
    if rt.is_main:
        save_vae_grids(task.vae, fixed, run_dir, "final", num_prior=cfg.vae.num_prior_samples, seed=cfg.run.seed)
        save_weights(task.vae, out, metadata={"family": cfg.tokenizer.family, "size": cfg.tokenizer.size,
                                              "steps": str(t.steps)})
        if bool(task.alarm_state[2]):
            console.print(f"[bold red]warning: the posterior was still collapsed at the end of training "
                          f"({task.alarm.collapsed_dims} dims below {task.alarm.threshold:g} nats)")
        console.print(f"[green]VAE written to {out}; grids in {run_dir}/recon_final.png, {run_dir}/prior_final.png")
    rt.barrier()
    return out


# -- the stage protocol (one module per command) -----------------------------------------------------------
NAME = "finetune"  # `ssr finetune` runs this stage for the vector-VAE families


def is_complete(cfg: Recipe) -> bool:
    """The VAE is exported and its checkpoints reached ``train.steps``."""
    done = Checkpointer(cfg.run_dir() / STAGE_DIR / "checkpoints").list()
    return finetuned_weights(cfg).is_file() and bool(done) and done[-1][0] >= cfg.train.steps


def run(cfg: Recipe, rt: Runtime):
    """:func:`run_vae_train`."""
    return run_vae_train(cfg, rt)
