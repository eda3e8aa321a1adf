"""LightningDiT training on cached latents (``ssr train-dit``) and sampling (``ssr sample``).

The DiT sees normalised latents x = (z − mean) / std with the per-channel statistics of the cache;
samples are de-normalised before decoding. Outputs live in ``<run>/dit/`` (checkpoints, metrics,
``dit_ema.safetensors``, ``dit_config.json``) and ``<run>/samples/`` (PNGs and ``samples.npz``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssr_cli.data import batch_source
from ssr_cli.engine import EMA, TrainSpec, train
from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console, make_progress
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.finetune import load_tokenizer_for_run
from ssr_cli.images import save_png
from ssr_cli.inputs import file_sha256, refresh, settings
from ssr_cli.latents import LatentShards, latents_dir, latents_fingerprint, load_stats, read_manifest
from ssr_cli.models.dit import build_dit
from ssr_cli.models.flow import cfg_velocity, flow_loss, initial_noise, sample_ode, sample_t_logit_normal
from ssr_cli.models.weights import read_safetensors, save_weights
from ssr_cli.npz import NpzWriter
from ssr_cli.recipe import Recipe, dump
from ssr_cli.training import fixed_seed

DIT_DIR = "dit"
EMA_FILE = "dit_ema.safetensors"
CONFIG_FILE = "dit_config.json"
STATS_FILE = "latent_stats.safetensors"
"""The per-channel (mean, std) the DiT's inputs were normalised with; it travels with the DiT's weights."""


def _dit_kwargs(cfg: Recipe, manifest: dict) -> dict:
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


def dit_inputs(cfg: Recipe) -> dict:
    """What the DiT's training depends on (more steps continue a run; other latents or settings restart it)."""
    return {"latents": latents_fingerprint(latents_dir(cfg)), "seed": cfg.run.seed,
            "dit": settings(cfg.dit, "steps", "ckpt_every_steps", "keep_last", "log_every_steps", "max_nonfinite_steps")}


def sample_inputs(cfg: Recipe, tokenizer_weights) -> dict:
    """What the sample PNGs depend on (more images extend the set; other weights or settings redo it)."""
    out = cfg.run_dir() / DIT_DIR
    if cfg.sample.use_ema:
        dit = file_sha256(out / EMA_FILE)
    else:
        newest = Checkpointer(out / "checkpoints").list()
        dit = file_sha256(newest[-1][1]) if newest else None
    return {"dit": dit, "latents": latents_fingerprint(latents_dir(cfg)), "tokenizer": file_sha256(tokenizer_weights),
            "sample": settings(cfg.sample, "num_images", "batch_size", "out_dir")}


def run_train_dit(cfg: Recipe, rt: Runtime) -> Path:
    lat_dir = latents_dir(cfg)
    manifest = read_manifest(lat_dir)
    mean, std = load_stats(lat_dir)
    kwargs = _dit_kwargs(cfg, manifest)
    with fixed_seed(step_seed(cfg.run.seed, "dit-init")):  # the starting weights depend on run.seed alone
        model = build_dit_from(kwargs)
    task = DiTTask(model, mean, std, cosine_weight=1.0 if cfg.dit.cosine_loss else 0.0,
                   t_mean=cfg.dit.t_mean, t_std=cfg.dit.t_std)
    ema = EMA(model, cfg.dit.ema_decay)
    dataset = LatentShards(lat_dir, random_flip=True)
    d = cfg.dit
    if d.batch_size % rt.world_size:
        raise ValueError(f"dit.batch_size ({d.batch_size}) must be divisible by the number of ranks ({rt.world_size})")
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
        steps=d.steps,
        lr=d.lr,
        run_dir=out,
        betas=d.betas,
        weight_decay=d.weight_decay,
        grad_clip=d.grad_clip or None,
        emas={"dit": (ema, lambda: model)},
        ckpt_every=d.ckpt_every_steps,
        keep_last=d.keep_last,
        log_every=d.log_every_steps,
        max_nonfinite_steps=d.max_nonfinite_steps,
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


def load_trained_dit(cfg: Recipe, use_ema: bool = True) -> tuple[nn.Module, dict]:
    out = cfg.run_dir() / DIT_DIR
    if not (out / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no trained DiT in {out} (missing {CONFIG_FILE}); run `ssr train-dit` first")
    kwargs = json.loads((out / CONFIG_FILE).read_text())
    kwargs.pop("latents", None)
    kwargs.pop("imported_from", None)
    model = build_dit_from(kwargs)
    if use_ema:
        model.load_state_dict(read_safetensors(out / EMA_FILE, "the DiT's EMA weights (written by train-dit)"))
    else:
        state = Checkpointer(out / "checkpoints").load_latest()
        if state is None:
            raise FileNotFoundError(f"no readable checkpoint under {out / 'checkpoints'}")
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


def image_labels(n: int, num_classes: int, mode: str, seed: int) -> list[int]:
    """Class label of each image index: balanced (i mod K) or uniform (drawn from the image's own seed)."""
    if mode == "balanced":
        return [i % num_classes for i in range(n)]
    return [int(np.random.default_rng(step_seed(seed, "label", i)).integers(num_classes)) for i in range(n)]


@torch.no_grad()
def run_sample(cfg: Recipe, rt: Runtime) -> Path:
    """Generate ``sample.num_images`` images: PNGs (skipping ones already written) and an ADM ``.npz``."""
    s = cfg.sample
    model, kwargs = load_trained_dit(cfg, use_ema=s.use_ema)
    model = model.to(rt.device)
    mean, std = dit_latent_stats(cfg)
    mean, std = mean.reshape(1, -1, 1, 1).to(rt.device), std.reshape(1, -1, 1, 1).to(rt.device)
    tokenizer, tokenizer_weights = load_tokenizer_for_run(cfg)
    tokenizer = tokenizer.to(rt.device).eval()
    out = samples_dir(cfg)
    (out / "png").mkdir(parents=True, exist_ok=True)
    if rt.is_main:  # PNGs drawn with another DiT, tokenizer or sampler setting are redrawn
        refresh(out / ".inputs.json", sample_inputs(cfg, tokenizer_weights), [out / "png", out / "samples.npz"],
                "sample", console)
        (out / "png").mkdir(parents=True, exist_ok=True)
    rt.barrier()
    num_classes = kwargs["num_classes"]
    labels = image_labels(s.num_images, num_classes, s.labels, s.seed)
    shape = (kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    mine = [i for i in range(rt.rank, s.num_images, rt.world_size) if not (out / "png" / f"{i:06d}.png").is_file()]

    def velocity(x, t, y):
        with rt.autocast():
            v = cfg_velocity(model, x, t, y, s.cfg_scale, interval=s.cfg_interval, null_class=num_classes)
        return v.float()

    with make_progress(disable=not rt.is_main) as progress:
        task = progress.add_task("sample", total=len(mine), status="", rate="")
        for start in range(0, len(mine), s.batch_size):
            idx = mine[start:start + s.batch_size]
            noise = initial_noise([step_seed(s.seed, "noise", i) for i in idx], shape, rt.device)
            y = torch.tensor([labels[i] for i in idx], device=rt.device)
            x = sample_ode(lambda xx, tt: velocity(xx, tt, y), noise, steps=s.steps, method=s.sampler, shift=s.shift)
            z = x * std + mean
            with rt.autocast():
                images = tokenizer.decode(z)
            for i, img in zip(idx, images.float().clamp(-1, 1).cpu()):
                save_png(img, out / "png" / f"{i:06d}.png", quantize=s.quantize)
            progress.update(task, advance=len(idx))
    rt.barrier()
    if rt.is_main:
        write_npz(out, s.num_images, labels, protocol=sampling_protocol(cfg))
    rt.barrier()
    return out / "samples.npz"


def sampling_protocol(cfg: Recipe) -> dict:
    """How ``ssr sample`` made its images, for ``samples.json`` (and from there every eval.json)."""
    s = cfg.sample
    return {"num_images": s.num_images, "labels": s.labels, "sampler": s.sampler, "steps": s.steps,
            "shift": s.shift, "cfg_scale": s.cfg_scale, "cfg_interval": list(s.cfg_interval), "seed": s.seed,
            "quantize": s.quantize, "use_ema": s.use_ema, "dit": cfg.dit.model}


def write_npz(out: Path, n: int, labels: list[int], protocol: dict | None = None) -> Path:
    """ADM layout, streamed one PNG at a time: ``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels; with
    ``protocol`` also ``samples.json`` (the sampling settings) beside it."""
    from PIL import Image

    def image(i: int) -> np.ndarray:
        with Image.open(out / "png" / f"{i:06d}.png") as img:
            return np.asarray(img.convert("RGB"))

    first = image(0)
    with NpzWriter(out / "samples.npz") as writer:
        writer.add_stream("arr_0", (n, *first.shape), np.uint8)
        writer.write("arr_0", first[None])
        for i in range(1, n):
            writer.write("arr_0", image(i)[None])
        writer.add("arr_1", np.asarray(labels[:n], dtype=np.int64))
    if protocol is not None:
        write_json_atomic(out / "samples.json", protocol, indent=2)
    console.print(f"[green]{n} samples in {out / 'png'}, ADM batch {out / 'samples.npz'} {(n, *first.shape)}")
    return out / "samples.npz"
