"""What every stage needs: the recipe's tokenizer, images and optimisation settings, the run's files.

The stage modules (one per command: ``finetune``, ``vae``, ``encode_latents``, ``train_dit``, ``sample``,
``evaluate``, ``probe_channels``, ``denoise``, ``diffusability``, ``pipeline``) import from here and from the
layers below (models, engine, data, metrics), never from each other, except ``pipeline``, which runs them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ssr_cli.blur import gaussian_blur
from ssr_cli.data import batch_source, build_dataset
from ssr_cli.engine import TrainSpec, lr_lambda
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.errors import UserError, UserFileNotFoundError, UserValueError
from ssr_cli.inputs import file_identity, file_sha256
from ssr_cli.latent_cache import latents_dir, load_stats
from ssr_cli.metrics import (
    InceptionFeatures,
    load_lpips,
)
from ssr_cli.models.dit import build_dit
from ssr_cli.models.flow import flow_loss, sample_t_logit_normal
from ssr_cli.models.registry import VECTOR_VAE_FAMILIES as VAE_FAMILIES
from ssr_cli.models.registry import build_tokenizer as build_registered_tokenizer
from ssr_cli.models.weights import read_safetensors
from ssr_cli.recipe import OptimConfig, Recipe, dump


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


def optimisation(o: OptimConfig) -> dict:
    """The :class:`TrainSpec` fields of an optimisation section (``[train]`` or ``[dit]``)."""
    return {"steps": o.steps, "lr": o.lr, "betas": o.betas, "weight_decay": o.weight_decay,
            "grad_clip": o.grad_clip or None, "ckpt_every": o.ckpt_every_steps, "keep_last": o.keep_last,
            "log_every": o.log_every_steps, "max_nonfinite_steps": o.max_nonfinite_steps}


def train_spec(cfg: Recipe, rt: Runtime, *, name: str, model: nn.Module, param_groups: list[ParamGroup], dataset,
               run_dir: Path, steps: int | None = None, lr: float | None = None, constant_lr: bool = False,
               seed: int | None = None, **extra) -> TrainSpec:
    """A :class:`TrainSpec` from ``[train]`` (batch, accumulation, optimiser, schedule, clipping, checkpoints,
    logging) and ``[run]`` (seed, compile); ``steps``/``lr`` override ``train.steps``/``train.lr`` (the
    pretraining stage), ``constant_lr`` replaces the schedule; ``extra`` goes to TrainSpec (emas, hooks, …)."""
    t = cfg.train
    world_batch = rt.world_size * t.grad_accum
    if t.batch_size % world_batch:
        raise UserValueError(f"train.batch_size ({t.batch_size}) must be divisible by ranks × train.grad_accum "
                             f"({world_batch})")
    optim = optimisation(t)
    if steps is not None:  # the pretraining stage's own budget and rate
        optim["steps"] = steps
    if lr is not None:
        optim["lr"] = lr
    steps, lr = optim["steps"], optim["lr"]
    return TrainSpec(
        name=name,
        model=model,
        param_groups=param_groups,
        batches=batch_source(dataset, batch_per_rank=t.batch_size // world_batch, grad_accum=t.grad_accum,
                             seed=cfg.run.seed, rank=rt.rank, world_size=rt.world_size, num_workers=cfg.data.num_workers),
        run_dir=run_dir,
        schedule=lr_lambda(schedule="constant" if constant_lr else t.schedule, total_steps=steps, lr=lr,
                           lr_init=t.lr_init, lr_min=t.lr_min, warmup_frac=t.warmup_frac, cosine_frac=t.cosine_frac),
        grad_accum=t.grad_accum,
        **optim,
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


EXPORT_NAME = "tokenizer.safetensors"


DYNAMICS_NAME = "ssr_dynamics.safetensors"


def build_tokenizer(cfg: Recipe, weights: str | Path | None = "recipe"):
    """The recipe's tokenizer, with the recipe's weights (or ``weights`` when given; None: a random
    initialisation drawn from ``run.seed`` alone, so two runs of one recipe start from the same weights)."""
    tok = cfg.tokenizer
    path = tok.weights if weights == "recipe" else weights
    with fixed_seed(step_seed(cfg.run.seed, "tokenizer-init")):
        model = build_registered_tokenizer(tok.family, tok.size, weights=path, strict=tok.strict,
                                           architecture=tok.weights, **tok.overrides)
    if tok.grad_checkpointing:
        try:
            model.grad_checkpointing = True
        except (TypeError, AttributeError):
            raise UserError(f"tokenizer.grad_checkpointing = true is not supported by tokenizer.family "
                            f"{tok.family!r}; set it to false") from None
    return model


def finetuned_weights(cfg: Recipe) -> Path:
    return cfg.run_dir() / EXPORT_NAME


def learned_dynamics_path(cfg: Recipe) -> Path:
    """Where the fine-tune stage of an SSR run writes the A, Ā and Δ it learned (:func:`ssr_cli.dynamics.save_dynamics`)."""
    return cfg.run_dir() / "finetune" / DYNAMICS_NAME


def load_tokenizer_for_run(cfg: Recipe):
    """The run's fine-tuned tokenizer when it exists, else the recipe's weights (with a note); a UserError when
    there is neither (a later stage never runs on a randomly initialised tokenizer)."""
    path = finetuned_weights(cfg)
    if path.is_file():
        return build_tokenizer(cfg, weights=path), path
    if not cfg.tokenizer.weights:
        raise UserError(f"no tokenizer for run {cfg.run.name!r}: {path} does not exist and tokenizer.weights is not set; "
                        "run `ssr finetune` with this recipe first (or check run.name and run.out_dir)")
    console.print(f"[yellow]no fine-tuned tokenizer at {path}; using {cfg.tokenizer.weights} (run `ssr finetune` first)")
    return build_tokenizer(cfg), cfg.tokenizer.weights


def require_lpips_weights(cfg: Recipe, weight: float) -> None:
    """An LPIPS term with weight > 0 needs loss.lpips_weights: say so, naming the file to use."""
    if weight > 0 and not cfg.loss.lpips_weights:
        raise UserFileNotFoundError(
            "an LPIPS loss weight is > 0 but loss.lpips_weights is not set: point it at the AlexNet features file "
            "(e.g. ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth, torchvision's alexnet-owt-7be5be79.pth "
            "works too) or set loss.lambda_lpips = 0 and regularizer.lambda_pred_lpips = 0"
        )


LPIPS_MIN_SIDE = 32
"""Smallest image side the LPIPS loss sees (AlexNet's and VGG's pooling need it); smaller pairs are upsampled."""


def shared_lpips(net: str, path, device: torch.device):
    """``load_lpips`` once per backbone file (as it is now), net and device in a process: the stages of a pipeline
    (the fine-tune's loss, the evaluation) share one frozen model instead of building and loading it each time."""
    path = Path(path) if path else None
    if path is None or not path.is_file():
        return load_lpips(net, path, device=device)  # its own error (where to get the weights) or the hub cache
    return _lpips_model(net, *file_identity(path), str(torch.device(device)))


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str, path: str, dev: int, ino: int, size: int, mtime_ns: int, device: str):
    return load_lpips(net, path, device=device)


def make_lpips(cfg: Recipe, weight: float, device: torch.device):
    """The LPIPS loss callable, or None when its weight is zero."""
    if weight <= 0:
        return None
    require_lpips_weights(cfg, weight)
    net = shared_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights, device)

    def lpips_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.float(), y.float()
        side = min(x.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            # The downscaled pairs of EQ-VAE / FT-SE at CIFAR size (16², 8²) are too small for AlexNet's pooling:
            # compare them at LPIPS_MIN_SIDE after the same bilinear upsampling of both images.
            size = [round(d * LPIPS_MIN_SIDE / side) for d in x.shape[-2:]]
            x, y = (torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (x, y))
        return net(x, y).flatten()

    return lpips_fn


DIT_DIR = "dit"


EMA_FILE = "dit_ema.safetensors"


CONFIG_FILE = "dit_config.json"


STATS_FILE = "latent_stats.safetensors"
"""The per-channel (mean, std) the DiT's inputs were normalised with; it travels with the DiT's weights."""


def dit_kwargs(cfg: Recipe, manifest: dict) -> dict:
    c, h, _ = manifest["latent_shape"]
    overrides = {k: v for k, v in (("depth", cfg.dit.depth), ("hidden_size", cfg.dit.hidden_size),
                                   ("num_heads", cfg.dit.num_heads)) if v is not None}
    return {
        "name": cfg.dit.model,
        "input_size": h,
        "in_channels": c,
        "num_classes": cfg.dit.num_classes or manifest["num_classes"],
        "qk_norm": cfg.dit.qk_norm,
        "class_dropout": cfg.dit.class_dropout,
        "time_scale": cfg.dit.time_scale,
        **overrides,
    }


def build_dit_from(kwargs: dict) -> nn.Module:
    kw = dict(kwargs)
    return build_dit(kw.pop("name"), **kw)


def load_trained_dit(cfg: Recipe, use_ema: bool = True) -> tuple[nn.Module, dict]:
    out = cfg.run_dir() / DIT_DIR
    if not (out / CONFIG_FILE).is_file():
        raise UserFileNotFoundError(f"no trained DiT in {out} (missing {CONFIG_FILE}); run `ssr train-dit` first")
    try:
        kwargs = json.loads((out / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserValueError(f"{out / CONFIG_FILE} is not valid JSON ({exc}); run `ssr train-dit` with this "
                             "recipe again: it resumes from its last checkpoint and rewrites the file") from None
    kwargs.pop("latents", None)
    kwargs.pop("imported_from", None)
    model = build_dit_from(kwargs)
    if use_ema:
        model.load_state_dict(read_safetensors(out / EMA_FILE, "the DiT's EMA weights (written by train-dit)"))
    else:
        state = Checkpointer(out / "checkpoints").load_latest()
        if state is None:
            raise UserFileNotFoundError(f"no readable checkpoint under {out / 'checkpoints'}")
        model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items() if k.startswith("model.")})
    return model.eval(), kwargs


def dit_latent_stats(cfg: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (C,), of the run's DiT: its own copy (written by train-dit and import-dit), else the
    latent cache's (DiTs trained before the copy existed)."""
    path = cfg.run_dir() / DIT_DIR / STATS_FILE
    if path.is_file():
        stats = read_safetensors(path, "the DiT's latent statistics (mean, std)")
        return stats["mean"], stats["std"]
    return load_stats(latents_dir(cfg))


def samples_dir(cfg: Recipe) -> Path:
    return Path(cfg.sample.out_dir) if cfg.sample.out_dir else cfg.run_dir() / "samples"


def tokenizer_sha256(cfg: Recipe) -> str | None:
    """The hash of the tokenizer the later stages read: the run's fine-tuned one, else the recipe's weights."""
    return file_sha256(finetuned_weights(cfg)) or file_sha256(cfg.tokenizer.weights)


def record_path(cfg: Recipe, stage: str) -> Path:
    return cfg.run_dir() / f".pipeline_{stage}.json"


def recorded(cfg: Recipe, stage: str) -> dict | None:
    return read_json(record_path(cfg, stage))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_inception(cfg: Recipe, device: torch.device):
    """The Inception extractor, or None (with the reason) when no weights are configured."""
    path = cfg.eval.inception_weights
    if not path:
        return None, f"no Inception weights: {INCEPTION_HINT}"
    if not Path(path).is_file():
        raise UserFileNotFoundError(f"eval.inception_weights file not found: {path}; {INCEPTION_HINT}")
    return _inception(*file_identity(path), str(torch.device(device))), None


@functools.lru_cache(maxsize=2)
def _inception(path: str, dev: int, ino: int, size: int, mtime_ns: int, device: str) -> InceptionFeatures:
    """One extractor per weights file (as it is now) and device in a process: an evaluation's reconstruction
    and generation parts, and the commands of a pipeline, share it instead of building and loading it each time
    (~1 s of CPU each). It is frozen and holds no state between calls."""
    return InceptionFeatures(path, device=device)


INCEPTION_HINT = (
    "set eval.inception_weights to the TF-Inception state dict "
    "(e.g. ../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth, or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth)"
)


def is_vae_family(cfg: Recipe) -> bool:
    return cfg.tokenizer.family in VAE_FAMILIES


@torch.no_grad()
def dynamics_error(tokenizer, images: torch.Tensor, dynamics, tau_pairs: list[tuple[float, float]], *,
                   mean_centering: bool = True) -> dict[str, float]:
    """How well Ā predicts the latent of a blurrier image from a sharper one (what SSR trains), over ``images``.

    For each (τ1, τ2): z1 = E(blur(x, τ1)), z2 = E(blur(x, τ2)) (posterior means), ẑ2 = dynamics.predict(z1).
    Returns ``relative`` = Σ‖ẑ2 − z2‖² / Σ‖z2 − spatial mean‖² and ``no_change`` = the same with ẑ2 = z1
    (the error of assuming the latent does not move), both summed over images, channels and pairs."""
    err = base = still = 0.0
    n = images.shape[0]
    for tau1, tau2 in tau_pairs:
        z1 = tokenizer.encode_latent(gaussian_blur(images, torch.full((n,), float(tau1), device=images.device))).float()
        z2 = tokenizer.encode_latent(gaussian_blur(images, torch.full((n,), float(tau2), device=images.device))).float()
        pred = dynamics.to(z1.device).predict(z1, mean_centering=mean_centering)
        err += float((pred - z2).double().pow(2).sum())
        still += float((z1 - z2).double().pow(2).sum())
        base += float((z2 - z2.mean(dim=(-2, -1), keepdim=True)).double().pow(2).sum())
    base = max(base, 1e-30)
    return {"relative": err / base, "no_change": still / base}


class DiTTask(nn.Module):
    """Rectified-flow training objective on normalised latents."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, cosine_weight: float,
                 t_mean: float, t_std: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float(), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float(), persistent=False)
        self.cosine_weight = cosine_weight
        self.t_mean, self.t_std = t_mean, t_std

    def forward(self, batch, step_rng: torch.Generator) -> dict[str, torch.Tensor]:
        z, y = batch
        x1 = (z.float() - self.mean) / self.std
        t = sample_t_logit_normal(x1.shape[0], None, x1.device, mean=self.t_mean, std=self.t_std)
        return flow_loss(self.model, x1, y, t=t, cosine_weight=self.cosine_weight)
