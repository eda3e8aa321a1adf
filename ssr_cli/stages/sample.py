"""``ssr sample``: images from the trained DiT, decoded by the run's tokenizer.

Latents drawn by the ODE are de-normalised with the DiT's own statistics before decoding. Outputs live in
``<run>/samples/``: PNGs (resumable, one per image index), ``samples.npz`` (ADM layout) and ``samples.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.checkpoint import Checkpointer
from ssr_cli.engine.progress import console, make_progress
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.images import save_png
from ssr_cli.inputs import file_sha256, refresh, settings
from ssr_cli.latent_cache import latents_dir, latents_fingerprint
from ssr_cli.models.flow import cfg_velocity, initial_noise, sample_ode
from ssr_cli.npz import NpzWriter
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    DIT_DIR,
    EMA_FILE,
    dit_latent_stats,
    load_tokenizer_for_run,
    load_trained_dit,
    recorded,
    samples_dir,
    tokenizer_sha256,
)


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


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "sample"
PIPELINE_RECORD = True


def inputs(cfg: Recipe) -> dict:
    return {"tokenizer": tokenizer_sha256(cfg), "dit": file_sha256(cfg.run_dir() / DIT_DIR / EMA_FILE),
            "latents": latents_fingerprint(latents_dir(cfg)), "sample": settings(cfg.sample, "batch_size")}


def is_complete(cfg: Recipe) -> bool:
    npz = samples_dir(cfg) / "samples.npz"
    present = npz.is_file()
    if present:
        with np.load(npz) as f:
            present = f["arr_0"].shape[0] == cfg.sample.num_images
    return present and recorded(cfg, NAME) == inputs(cfg)


def run(cfg: Recipe, rt: Runtime) -> Path:
    return run_sample(cfg, rt)
