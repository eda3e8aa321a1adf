"""The latent cache: its files (written by ``ssr encode-latents``) and the data set the DiT trains on.

Layout of ``<latents dir>``:
  shard_00000.safetensors ...  tensors ``latents`` (N, C, h, w) float32, ``latents_flip`` (the latent of
                               the horizontally flipped image, when enabled), ``labels`` (N,) int64,
                               ``indices`` (N,) int64 (data set indices)
  latents_stats.pt             ``mean``, ``std``: per-channel, shape (1, C, 1, 1), over ``stats_count`` latents
                               (seeded, class-stratified); LightningDiT's file name and format; older caches have
                               stats.safetensors
  manifest.json                tokenizer, weights file and its SHA-256, recipe, shapes, classes, shards

The folder is also a LightningDiT latent folder: its ``ImgLatentDataset`` reads every ``*.safetensors`` shard
(``latents``, ``latents_flip``, ``labels``) and ``latents_stats.pt`` (set latent_norm: true, latent_multiplier: 1.0;
it needs latents.flip = true). The other way round, a LightningDiT folder without manifest.json is read as a
cache (``latents.out_dir`` = that folder): shards in sorted name order, its statistics, labels 0..max.

Shards are written atomically and a finished shard is skipped when the command runs again, so an
interrupted encode resumes. Under torchrun shard k is written by rank k mod world_size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ssr_cli.data import subset_indices
from ssr_cli.engine.atomic import atomic_write
from ssr_cli.errors import UserValueError, UserFileNotFoundError, one_line
from ssr_cli.inputs import file_sha256
from ssr_cli.models.lightningdit import read_stats, write_stats
from ssr_cli.models.weights import WeightsError, read_safetensors
from ssr_cli.recipe import Recipe

MANIFEST = "manifest.json"


STATS = "latents_stats.pt"


LEGACY_STATS = "stats.safetensors"


def latents_dir(cfg: Recipe) -> Path:
    return Path(cfg.latents.out_dir) if cfg.latents.out_dir else cfg.run_dir() / "latents"


def shard_ok(path: Path, expected_rows: int) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("labels").get_shape()[0] == expected_rows
    except Exception:  # noqa: BLE001 - unreadable means "redo it"
        return False


def save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def latents_fingerprint(directory: Path) -> str | None:
    """A hash of what a latent cache holds (its manifest, less the recipe text and file paths, and its statistics
    file); None when there is no complete cache. What the DiT's checkpoints and samples are made from."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    manifest.pop("recipe", None)
    manifest.get("tokenizer", {}).pop("weights", None)
    text = json.dumps(manifest, sort_keys=True) + str(file_sha256(Path(directory) / STATS))
    return hashlib.sha256(text.encode()).hexdigest()


def compute_stats(shards: list[Path], count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-channel mean and std (float64 accumulation) over ``count`` latents (and their flips): a seeded,
    class-stratified subset (:func:`ssr_cli.data.subset_indices`) of the cache, every latent when it holds fewer
    (shards follow the data set's sorted order, so the first ``count`` would be a few classes only)."""
    labels = []
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            labels.append(f.get_tensor("labels"))
    labels = torch.cat(labels).numpy()
    chosen = subset_indices(labels, count, seed=seed, rule="stratified")
    s1 = s2 = None
    pixels = 0
    start = 0
    for path in shards:
        data = load_file(str(path))
        rows = data["latents"].shape[0]
        local = chosen[(chosen >= start) & (chosen < start + rows)] - start
        start += rows
        if local.size == 0:
            continue
        pick = torch.from_numpy(local)
        for key in ("latents", "latents_flip"):
            if key not in data:
                continue
            z = data[key][pick].double()
            s1 = z.sum(dim=(0, 2, 3)) if s1 is None else s1 + z.sum(dim=(0, 2, 3))
            s2 = z.pow(2).sum(dim=(0, 2, 3)) if s2 is None else s2 + z.pow(2).sum(dim=(0, 2, 3))
            pixels += z.shape[0] * z.shape[2] * z.shape[3]
    mean = s1 / pixels
    var = (s2 / pixels - mean.pow(2)).clamp_min(0)
    return {"mean": mean.float(), "std": var.sqrt().clamp_min(1e-6).float()}


def save_stats(stats: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: write_stats(tmp, stats["mean"], stats["std"]))


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserValueError(f"{path} is not valid JSON ({exc}); delete the latent folder {directory} and run "
                                 "`ssr encode-latents` again") from None
    shards = sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []
    if shards and (Path(directory) / STATS).is_file():
        return _lightningdit_manifest(Path(directory), shards)
    raise UserFileNotFoundError(f"no latent cache at {directory}: expected {MANIFEST} (run `ssr encode-latents` first) "
                                f"or a LightningDiT latent folder (*.safetensors shards and {STATS}), found neither")


def open_shard(path: Path, what: str = "a latent shard (.safetensors, written by `ssr encode-latents`)"):
    """``safe_open`` of a latent shard (memory-mapped, never unpickled); a file that is not safetensors (a pickle
    under a shard's name, a damaged file) is one WeightsError line naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for files that are not safetensors
        raise WeightsError(f"{path}: expected {what}, but it cannot be read as safetensors ({one_line(exc)})") from None


def _lightningdit_manifest(directory: Path, shards: list[Path]) -> dict:
    """The manifest of a LightningDiT latent folder, read from its shards."""
    labels, flips, shape = [], [], None
    for path in shards:
        with open_shard(path, "a LightningDiT latent shard (.safetensors)") as f:
            keys = set(f.keys())
            if not {"latents", "labels"} <= keys:
                raise WeightsError(f"{path}: expected a LightningDiT latent shard with 'latents' and 'labels' "
                                   f"(and 'latents_flip'), found {sorted(keys)}")
            labels.append(f.get_tensor("labels"))
            flips.append("latents_flip" in keys)
            shape = shape or list(f.get_slice("latents").get_shape()[1:])
    all_labels = torch.cat(labels)
    return {"tokenizer": None, "source": "lightningdit", "num_images": int(all_labels.numel()),
            "latent_shape": shape, "posterior": "unknown", "flip_copies": all(flips), "classes": [],
            "num_classes": int(all_labels.max()) + 1, "shards": [p.name for p in shards],
            "stats": {"file": STATS}}


def load_stats(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each (C,), of a cache (ours or LightningDiT's)."""
    if (Path(directory) / STATS).is_file():
        return read_stats(Path(directory) / STATS)
    if (Path(directory) / LEGACY_STATS).is_file():
        stats = read_safetensors(Path(directory) / LEGACY_STATS, "latent statistics (mean, std)")
        return stats["mean"], stats["std"]
    raise UserFileNotFoundError(f"no latent statistics in {directory} (expected {STATS}); run `ssr encode-latents`")


class LatentShards(Dataset):
    """Cached latents; item ``(index, aug_seed)`` -> (latent (C, h, w), label). Random flip = picking
    the flipped copy with probability ½ from the item's seed (no seed: the unflipped latent)."""

    def __init__(self, directory: str | Path, random_flip: bool = True) -> None:
        self.dir = Path(directory)
        manifest = read_manifest(self.dir)
        self.manifest = manifest
        self.random_flip = random_flip and manifest["flip_copies"]
        # Shards are memory-mapped and read row by row, so caches larger than RAM work too.
        self.shards = [self.dir / s for s in manifest["shards"]]
        self.offsets = [0]
        labels = []
        for path in self.shards:
            with open_shard(path) as f:
                labels.append(f.get_tensor("labels"))
            self.offsets.append(self.offsets[-1] + labels[-1].shape[0])
        self.labels = torch.cat(labels)
        self._handles: dict[int, object] = {}

    def _row(self, index: int, key: str) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if k not in self._handles:
            self._handles[k] = open_shard(self.shards[k])
        return self._handles[k].get_slice(key)[index - self.offsets[k]]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        use_flip = (self.random_flip and aug_seed is not None
                    and np.random.default_rng(aug_seed).random() < 0.5)
        z = self._row(index, "latents_flip" if use_flip else "latents")
        return z, self.labels[index]
