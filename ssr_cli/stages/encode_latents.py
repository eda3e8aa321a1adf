"""``ssr encode-latents``: encode the recipe's images with the run's tokenizer into the latent cache
(:mod:`ssr_cli.latent_cache`: shards, statistics, manifest), resumable shard by shard."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.progress import console, make_progress
from ssr_cli.engine.runtime import Runtime, generator_for
from ssr_cli.inputs import file_sha256, refresh, settings
from ssr_cli.latent_cache import (
    LEGACY_STATS,
    MANIFEST,
    STATS,
    compute_stats,
    latents_dir,
    save_shard,
    save_stats,
    shard_ok,
)
from ssr_cli.models.tokenizer import DiagonalGaussian
from ssr_cli.recipe import Recipe, dump
from ssr_cli.stages.common import image_dataset, load_tokenizer_for_run, recorded, tokenizer_sha256


def _cache_key(cfg: Recipe, weights_sha256: str | None, n: int) -> dict:
    """What the shards depend on; a cache made with anything else is not reused."""
    return {"family": cfg.tokenizer.family, "size": cfg.tokenizer.size, "weights_sha256": weights_sha256,
            "num_images": n, "shard_size": cfg.latents.shard_size, "posterior": cfg.latents.sample_posterior,
            "flip": cfg.latents.flip, "seed": cfg.run.seed, "data": settings(cfg.data, "num_workers", "random_crop", "random_flip")}


def _discard_stale(out: Path, cfg: Recipe, weights_sha256: str | None, n: int) -> None:
    """Drop shards left by an encode with another tokenizer, data set or latent setting (warning loudly)."""
    refresh(out / ".cache_key.json", _cache_key(cfg, weights_sha256, n),
            [*sorted(out.glob("shard_*.safetensors")), out / MANIFEST, out / STATS, out / LEGACY_STATS],
            "encode-latents", console)


@torch.no_grad()
def encode_latents(cfg: Recipe, rt: Runtime) -> Path:
    """Encode the recipe's data set with the run's (fine-tuned) tokenizer into shards + stats + manifest."""
    out = latents_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, weights = load_tokenizer_for_run(cfg)
    tokenizer = tokenizer.to(rt.device).eval()
    dataset = image_dataset(cfg, augment=False)
    lc = cfg.latents
    n = len(dataset)
    weights_sha256 = file_sha256(weights) if rt.is_main else None  # hashed once, by the rank that writes
    if rt.is_main:
        _discard_stale(out, cfg, weights_sha256, n)
    rt.barrier()
    n_shards = -(-n // lc.shard_size)
    mine = [k for k in range(n_shards) if k % rt.world_size == rt.rank]
    todo = [k for k in mine
            if not shard_ok(out / f"shard_{k:05d}.safetensors", min(lc.shard_size, n - k * lc.shard_size))]
    if rt.is_main and len(todo) < len(mine):
        console.print(f"encode-latents: {len(mine) - len(todo)} finished shard(s) kept, {len(todo)} to write")

    def encode(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        with rt.autocast():
            post = tokenizer.encode(images.to(rt.device))
        if isinstance(post, DiagonalGaussian) and lc.sample_posterior:
            # One generator per image: the sample depends on the image, not on batch size or rank.
            noise = torch.stack([
                torch.randn(post.mean.shape[1:], generator=generator_for(cfg.run.seed, "latent", int(i)))
                for i in indices
            ]).to(post.mean.device)
            z = post.mean.float() + post.std.float() * noise
        else:
            z = post.mean if isinstance(post, DiagonalGaussian) else post
        return z.float().cpu()

    with make_progress(disable=not rt.is_main) as progress:
        task = progress.add_task("encode-latents", total=sum(min(lc.shard_size, n - k * lc.shard_size) for k in todo),
                                 status="", rate="")
        for k in todo:
            lo, hi = k * lc.shard_size, min(n, (k + 1) * lc.shard_size)
            zs, zfs, labels = [], [], []
            for start in range(lo, hi, lc.batch_size):
                idx = list(range(start, min(hi, start + lc.batch_size)))
                items = [dataset[(i, None)] for i in idx]
                images = torch.stack([x for x, _ in items])
                ids = torch.tensor(idx)
                zs.append(encode(images, ids))
                if lc.flip:
                    zfs.append(encode(images.flip(-1), ids + n))
                labels.extend(y for _, y in items)
                progress.update(task, advance=len(idx))
            tensors = {"latents": torch.cat(zs), "labels": torch.tensor(labels, dtype=torch.int64),
                       "indices": torch.arange(lo, hi, dtype=torch.int64)}
            if lc.flip:
                tensors["latents_flip"] = torch.cat(zfs)
            save_shard(tensors, out / f"shard_{k:05d}.safetensors")
    rt.barrier()
    if rt.is_main:
        shards = [out / f"shard_{k:05d}.safetensors" for k in range(n_shards)]
        stats = compute_stats(shards, lc.stats_count, seed=cfg.run.seed)
        save_stats(stats, out / STATS)
        first = load_file(str(shards[0]))
        manifest = {
            "tokenizer": {"family": cfg.tokenizer.family, "size": cfg.tokenizer.size,
                          "weights": str(weights) if weights else None, "weights_sha256": weights_sha256},
            "num_images": n,
            "latent_shape": list(first["latents"].shape[1:]),
            "posterior": "sample" if lc.sample_posterior else "mean",
            "flip_copies": lc.flip,
            "classes": list(getattr(dataset, "classes", [])),
            "num_classes": max(1, len(getattr(dataset, "classes", [])) or 1),
            "shards": [s.name for s in shards],
            "stats": {"file": STATS, "count": int(min(lc.stats_count, n)),
                      "subset": "stratified" if lc.stats_count < n else "all", "seed": cfg.run.seed},
            "recipe": dump(cfg),
        }
        write_json_atomic(out / MANIFEST, manifest, indent=2)
        console.print(f"[green]latents: {n} images, latent {tuple(manifest['latent_shape'])}, {n_shards} shard(s) in {out}")
    rt.barrier()
    return out


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "encode-latents"
PIPELINE_RECORD = True


def inputs(cfg: Recipe) -> dict:
    """What the cache depends on: the tokenizer's bytes, the latent and data settings, the seed."""
    return {"tokenizer": tokenizer_sha256(cfg), "latents": settings(cfg.latents), "seed": cfg.run.seed,
            "data": settings(cfg.data, "num_workers", "random_crop", "random_flip")}


def is_complete(cfg: Recipe) -> bool:
    return (latents_dir(cfg) / MANIFEST).is_file() and recorded(cfg, NAME) == inputs(cfg)


def run(cfg: Recipe, rt: Runtime) -> Path:
    return encode_latents(cfg, rt)
