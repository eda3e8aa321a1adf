"""Restoration with and without SSR on the bottleneck features (blog ``000``; ``ssr denoise``).

A compact residual U-Net (:class:`ssr_cli.models.restoration.Denoiser`) learns to remove synthetic white
Gaussian noise (``denoise.noise_sigma`` on the 0–255 scale) from random crops of the recipe's [data], on the
shared engine (resumable). ``regularizer.kind`` "ssr" adds, with probability ``regularizer.alpha``, the SSR
latent term (weight ``denoise.lambda_ssr``) on the bottleneck features, through the same
:class:`ssr_cli.dynamics.SSRDynamics` (basis, grid, Δ, learnable A) as tokenizer fine-tuning; the
bottleneck has one channel per basis function, so ``denoise.bottleneck_channels`` must equal W·H of
``regularizer.grid``. "none" is the baseline. ``denoise.compare = true`` trains both arms from the same seed
(same initial weights, batches and noise) and writes a comparison.

Evaluation: PSNR / SSIM (uint8) on held-out images with synthetic noise of the training σ (a fixed noise
draw, the same for every arm) and, with ``denoise.eval_pairs``, on real noisy/clean pairs (SIDD), center-
cropped to ``denoise.eval_crop``; the noisy input's own PSNR / SSIM are reported beside.

Run folder ``<run.out_dir>/<run.name>/``: one sub-folder per arm, ``baseline/`` or ``ssr/`` (checkpoints/,
metrics.jsonl, images/, denoiser.safetensors, denoise_eval.json; ssr/ also ssr_dynamics.safetensors), and
``comparison.json`` with ``compare``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ssr_cli.data import build_dataset, subset_indices
from ssr_cli.dynamics import dynamics_from_config, save_dynamics
from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.ema import EMA
from ssr_cli.engine.loop import train
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console, print_result_table
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.errors import UserError, UserFileNotFoundError, UserValueError
from ssr_cli.images import load_image_pairs, save_grid
from ssr_cli.models.restoration import Denoiser
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import Recipe
from ssr_cli.restoration import add_gaussian_noise, denoise_loss, evaluate_denoiser
from ssr_cli.stages.common import fixed_seed, image_dataset, train_spec

ARM_DIRS = {"none": "baseline", "ssr": "ssr"}
WEIGHTS_FILE = "denoiser.safetensors"
EVAL_FILE = "denoise_eval.json"
COMPARISON_FILE = "comparison.json"


def arms_of(cfg: Recipe) -> list[str]:
    """Regularizer kinds to train: both ("none", "ssr") with denoise.compare, else regularizer.kind."""
    if cfg.denoise.compare:
        return ["none", "ssr"]
    if cfg.regularizer.kind not in ARM_DIRS:
        raise UserValueError(f"regularizer.kind = '{cfg.regularizer.kind}' is not available for denoising: "
                             "choose 'ssr' or 'none' (or set denoise.compare = true for both)")
    return [cfg.regularizer.kind]


def build_denoiser(cfg: Recipe) -> nn.Module:
    """The recipe's denoiser, initialised from a seed derived from run.seed (identical for every arm)."""
    d = cfg.denoise
    with fixed_seed(step_seed(cfg.run.seed, "denoiser-init")):
        return Denoiser(channels=d.channels, depth=d.depth, bottleneck_channels=d.bottleneck_channels,
                        blocks_per_level=d.blocks_per_level, feature_norm=d.feature_norm)


def build_dynamics(cfg: Recipe):
    """SSRDynamics of [regularizer] over the denoiser's bottleneck channels (W·H of regularizer.grid)."""
    try:
        return dynamics_from_config(cfg.regularizer, cfg.denoise.bottleneck_channels,
                                    image_size=cfg.data.image_size, seed=cfg.run.seed)
    except UserError as exc:  # a grid that does not fit: say which channels; anything else is a bug
        raise UserValueError(f"{exc} (here the channels are the denoiser's bottleneck: denoise.bottleneck_channels = "
                             f"{cfg.denoise.bottleneck_channels})") from None


def build_arms(cfg: Recipe) -> list[str]:
    """What ``--dry-run`` builds (and the run builds first): the arms, the denoiser and, for an SSR arm, its
    dynamics; a bad grid or kind is a ValueError. Returns a description of each."""
    kinds = arms_of(cfg)
    dynamics = build_dynamics(cfg) if "ssr" in kinds else None
    count = sum(p.numel() for p in build_denoiser(cfg).parameters())
    built = [f"denoiser {count / 1e6:.3f}M parameters ({count:,}; arms: "
             f"{', '.join('baseline' if k == 'none' else k for k in kinds)})"]
    if dynamics is not None:
        built.append(f"SSR on the {cfg.denoise.bottleneck_channels} bottleneck channels "
                     f"({sum(p.numel() for p in dynamics.parameters()):,} A nonzeros and log Δ)")
    return built


class DenoiseTask(nn.Module):
    """What the engine trains: noise is drawn inside ``forward`` from torch's per-step seeded RNG (so the
    two arms of a comparison see the same noise), then :func:`denoise_loss` with or without SSR."""

    def __init__(self, model: nn.Module, dynamics: nn.Module | None, cfg: Recipe, target: EMA | None = None) -> None:
        super().__init__()
        self.model = model
        self.dynamics = dynamics
        self.cfg = cfg
        self._target = target  # an EMA, deliberately not a sub-module

    def forward(self, batch, step_rng: torch.Generator) -> dict[str, torch.Tensor]:
        clean = batch[0] if isinstance(batch, (list, tuple)) else batch
        d, r = self.cfg.denoise, self.cfg.regularizer
        noisy = add_gaussian_noise(clean, d.noise_sigma)
        target = self._target.shadow.bottleneck_features if self._target is not None else None
        return denoise_loss(self.model, clean, noisy, dynamics=self.dynamics, alpha=r.alpha, lambda_ssr=d.lambda_ssr,
                            tau_max=r.tau_max, delta_tau=r.delta_tau, mean_centering=r.mean_centering,
                            latent_loss=r.latent_loss, normalize_latent=d.normalize_latent, blur_source=d.blur_source, step_rng=step_rng,
                            target_features=target)


# ----------------------------------------------------------------------------------------------- evaluation sets


def heldout_clean_images(cfg: Recipe) -> list[torch.Tensor]:
    """Clean images (3, H, W) in [−1, 1] for the synthetic-noise evaluation.

    denoise.eval_images (folder / .tar): center crops of eval_crop px at native resolution, eval_count of them
    spread over the set. Otherwise from [data]: built-in photographs → crops drawn with another seed than
    training's; folder / tar → a seeded class-stratified subset of eval_count images, which were also seen in
    training (a note says so).
    """
    d, den = cfg.data, cfg.denoise
    if den.eval_images:
        kind = "tar" if den.eval_images.endswith(".tar") else "folder"
        ds = build_dataset(kind, path=den.eval_images, image_size=den.eval_crop, resize=False)
        n = min(den.eval_count, len(ds))
        picks = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
    elif d.source == "builtin":
        ds = build_dataset("builtin", image_size=d.image_size, builtin_crops=max(den.eval_count, 1),
                           seed=cfg.run.seed + 7919)  # other crops of the bundled photographs than training's
        picks = list(range(min(den.eval_count, len(ds))))
    else:
        ds = image_dataset(cfg, augment=False)
        # Seeded class-stratified, not the last files of a class-sorted folder/tar (a class or two).
        picks = subset_indices(ds.labels, den.eval_count, seed=cfg.run.seed).tolist()
        console.print("[yellow]denoise: no denoise.eval_images set; evaluating on a stratified subset of "
                      f"{len(picks)} images of [data], which training also saw")
    return [ds[(i, None)][0] for i in picks]


def synthetic_pairs(cfg: Recipe, clean: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy, clean) pairs with one fixed draw of the training noise (same for every arm and run)."""
    gen = torch.Generator().manual_seed(step_seed(cfg.run.seed, "denoise-eval-noise"))
    return [(add_gaussian_noise(c[None], cfg.denoise.noise_sigma, generator=gen)[0], c) for c in clean]


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def real_pairs(cfg: Recipe) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The real (noisy, clean) pairs of denoise.eval_pairs (NOISY/ and GT/), center-cropped; None when unset."""
    if not cfg.denoise.eval_pairs:
        return None
    root = Path(cfg.denoise.eval_pairs)
    if not root.is_dir():
        raise UserFileNotFoundError(f"denoise.eval_pairs folder not found: {root} (it needs NOISY/ and GT/ "
                                    f"sub-folders)")
    size = cfg.denoise.eval_crop
    return [(_center_crop(n, size), _center_crop(c, size)) for n, c in load_image_pairs(root / "NOISY", root / "GT")]


def evaluate_arm(model: nn.Module, synthetic: list, real: list | None, device: torch.device) -> dict:
    """{"synthetic": evaluate_denoiser(...), "real": ... or None}."""
    return {"synthetic": evaluate_denoiser(model, synthetic, device=device),
            "real": evaluate_denoiser(model, real, device=device) if real else None}


# ----------------------------------------------------------------------------------------------- training


@torch.no_grad()
def _grid(model: nn.Module, pairs: list, path: Path) -> Path:
    device = next(model.parameters()).device
    noisy = torch.stack([n for n, _ in pairs]).to(device)
    clean = torch.stack([c for _, c in pairs])
    out = model(noisy).float().clamp(-1, 1).cpu()
    return save_grid([noisy.clamp(-1, 1).cpu(), out, clean], path, row_labels=["noisy", "denoised", "clean"])


def train_arm(cfg: Recipe, rt: Runtime, kind: str, *, synthetic: list | None = None) -> nn.Module:
    """Train one arm ("none" or "ssr") in ``<run>/<baseline|ssr>/``; resumable. Returns the trained denoiser."""
    t, r = cfg.train, cfg.regularizer
    arm_dir = cfg.run_dir() / ARM_DIRS[kind]
    model = build_denoiser(cfg).to(rt.device)
    dynamics = build_dynamics(cfg) if kind == "ssr" else None
    target = EMA(model, r.ema_decay) if (kind == "ssr" and cfg.denoise.ema_target) else None
    task = DenoiseTask(model, dynamics, cfg, target)
    groups = [ParamGroup("denoiser", list(model.parameters()))]
    if dynamics is not None and dynamics.ssr_parameters():
        groups.append(ParamGroup("ssr", dynamics.ssr_parameters(), lr_mult=r.a_lr_mult, weight_decay=0.0))
    dataset = image_dataset(cfg)
    shown = (synthetic or [])[:4]
    hooks = [(t.image_every_steps, lambda step: _grid(task.model, shown, arm_dir / "images" / f"step_{step:08d}.png"))]
    spec = train_spec(
        cfg, rt, name=f"denoise ({ARM_DIRS[kind]})", model=task, param_groups=groups, dataset=dataset, run_dir=arm_dir,
        seed=cfg.run.seed,  # the same for both arms: same batches, same noise
        emas={"target": (target, lambda: task.model)} if target is not None else {},
        hooks=hooks if shown else [],
        find_unused_parameters=dynamics is not None,
    )
    train(spec, rt)
    if rt.is_main:
        save_weights(model, arm_dir / WEIGHTS_FILE, metadata={"arm": ARM_DIRS[kind], "steps": str(t.steps)})
        if dynamics is not None:
            save_dynamics(dynamics, arm_dir / "ssr_dynamics.safetensors")
    rt.barrier()
    return model


def run_denoise(cfg: Recipe, rt: Runtime) -> dict:
    """Train the arm(s), evaluate, print a table and write JSON. Returns {arm dir name: evaluation dict}."""
    kinds = arms_of(cfg)
    if "ssr" in kinds:
        build_dynamics(cfg)  # fail on a grid / channel mismatch before any training
    synthetic = synthetic_pairs(cfg, heldout_clean_images(cfg))
    real = real_pairs(cfg)
    results: dict[str, dict] = {}
    for kind in kinds:
        model = train_arm(cfg, rt, kind, synthetic=synthetic)
        if not rt.is_main:
            continue
        arm = ARM_DIRS[kind]
        res = {"arm": arm, "steps": cfg.train.steps, "noise_sigma": cfg.denoise.noise_sigma,
               **evaluate_arm(model, synthetic, real, rt.device)}
        write_json_atomic(cfg.run_dir() / arm / EVAL_FILE, res, indent=2)
        results[arm] = res
    if rt.is_main:
        if len(results) > 1:
            comparison = {"arms": results, "delta_ssr_minus_baseline": _deltas(results["baseline"], results["ssr"])}
            write_json_atomic(cfg.run_dir() / COMPARISON_FILE, comparison, indent=2)
        print_denoise_table(results, cfg)
        console.print(f"results written under {cfg.run_dir()}")
    rt.barrier()
    return results


def _deltas(base: dict, ssr: dict) -> dict:
    out = {}
    for part in ("synthetic", "real"):
        if base.get(part) and ssr.get(part):
            out[part] = {k: ssr[part][k] - base[part][k] for k in ("psnr", "ssim")}
    return out


def print_denoise_table(results: dict[str, dict], cfg: Recipe) -> None:
    """Rows: (set, metric); columns: noisy input, each arm and, for two arms, SSR − baseline."""
    first = next(iter(results.values()))
    values = ["noisy input", *results] + (["SSR − baseline"] if len(results) == 2 else [])
    rows = []
    sets = {"synthetic": f"synthetic ×{int(first['synthetic']['count'])}"}
    if first.get("real"):
        sets["real"] = f"real pairs ×{int(first['real']['count'])} ({Path(cfg.denoise.eval_pairs).name})"
    for part, label in sets.items():
        for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.4f}")):
            row = [label, metric.upper(), fmt.format(first[part][f"{metric}_input"])]
            row += [fmt.format(res[part][metric]) for res in results.values()]
            if len(results) == 2:
                a, b = (res[part][metric] for res in results.values())
                diff = b - a
                row.append(("+" if diff >= 0 else "") + fmt.format(diff) if math.isfinite(diff) else "-")
            rows.append(row)
    print_result_table(f"ssr denoise: σ = {cfg.denoise.noise_sigma:g}/255, {cfg.train.steps} steps", ["set", "metric"],
                       values, rows)


# -- the stage protocol (one module per command) -----------------------------------------------------------
NAME = "denoise"


def is_complete(cfg: Recipe) -> bool:
    """Every arm's evaluation is written (and the comparison when comparing); each arm resumes from its own
    checkpoints when run again."""
    arms = [ARM_DIRS[kind] for kind in arms_of(cfg)]
    files = [cfg.run_dir() / arm / EVAL_FILE for arm in arms] + ([cfg.run_dir() / COMPARISON_FILE] if len(arms) > 1 else [])
    return all(f.is_file() for f in files)


def run(cfg: Recipe, rt: Runtime):
    """:func:`run_denoise`."""
    return run_denoise(cfg, rt)
