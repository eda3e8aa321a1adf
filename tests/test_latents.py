"""encode-latents: shards hold exactly the tokenizer's latents; stats, resume and stale-cache handling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ssr_cli.data import build_dataset
from ssr_cli.engine import setup_runtime
from ssr_cli.latent_cache import LatentShards, latents_dir, load_stats
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import from_dict
from ssr_cli.stages.common import build_tokenizer
from ssr_cli.stages.encode_latents import encode_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tmp_path, **latents):
    cfg = from_dict({
        "run": {"name": "lat", "out_dir": str(tmp_path), "device": "cpu", "precision": "fp32"},
        "data": {"source": "builtin", "image_size": 16, "builtin_crops": 10},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "none"},
        "latents": {"shard_size": 4, "stats_count": 6, "batch_size": 3, **latents},
    })
    # The run's "fine-tuned" tokenizer: random weights saved where finetune would put them.
    torch.manual_seed(1)
    save_weights(build_tokenizer(cfg, weights=None), cfg.run_dir() / "tokenizer.safetensors")
    return cfg


def _images(cfg):
    d = cfg.data
    ds = build_dataset(d.source, image_size=d.image_size, builtin_crops=d.builtin_crops, seed=cfg.run.seed)
    return ds, torch.stack([ds[(i, None)][0] for i in range(len(ds))]), [ds[(i, None)][1] for i in range(len(ds))]


def test_shards_round_trip_the_tokenizer_latents_and_stats(tmp_path):
    cfg = _recipe(tmp_path, sample_posterior=False)
    rt = setup_runtime("cpu", "fp32")
    out = encode_latents(cfg, rt)
    tok = build_tokenizer(cfg, weights=cfg.run_dir() / "tokenizer.safetensors").eval()
    _, images, labels = _images(cfg)
    with torch.no_grad():
        z = tok.encode_latent(images)
        z_flip = tok.encode_latent(images.flip(-1))
    shards = sorted(out.glob("shard_*.safetensors"))
    assert [p.name for p in shards] == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    rows = [load_file(str(p)) for p in shards]
    torch.testing.assert_close(torch.cat([r["latents"] for r in rows]), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["latents_flip"] for r in rows]), z_flip, rtol=1e-5, atol=1e-5)
    assert torch.cat([r["labels"] for r in rows]).tolist() == labels
    assert torch.cat([r["indices"] for r in rows]).tolist() == list(range(10))
    # Stats: stats_count latents (a seeded class-stratified subset) and their flips, per channel, computed directly.
    from ssr_cli.data import subset_indices

    pick = torch.from_numpy(subset_indices(labels, 6, seed=0, rule="stratified"))
    assert len({labels[i] for i in pick.tolist()}) == 6 and pick.tolist() != list(range(6))  # not the first six
    both = torch.cat([z[pick], z_flip[pick]]).double()
    mean, std = load_stats(out)
    torch.testing.assert_close(mean.double(), both.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), both.std(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_shape"] == list(z.shape[1:]) and manifest["num_images"] == 10
    assert manifest["tokenizer"]["weights_sha256"] and manifest["posterior"] == "mean"
    # The data set the DiT reads: row i is latent i, or its flip copy when the seed says so.
    shards_ds = LatentShards(out, random_flip=True)
    assert len(shards_ds) == 10
    for i in range(10):
        torch.testing.assert_close(shards_ds[(i, None)][0], z[i], rtol=1e-5, atol=1e-5)
    picked = [torch.allclose(shards_ds[(3, seed)][0], z_flip[3], atol=1e-5) for seed in range(40)]
    assert 5 < sum(picked) < 35  # a fair coin per seed, not always one copy


def test_posterior_samples_depend_on_the_image_not_the_batch(tmp_path):
    a = _recipe(tmp_path / "a", batch_size=1)
    b = _recipe(tmp_path / "b", batch_size=4)
    rt = setup_runtime("cpu", "fp32")
    za = torch.cat([load_file(str(p))["latents"] for p in sorted(encode_latents(a, rt).glob("shard_*"))])
    zb = torch.cat([load_file(str(p))["latents"] for p in sorted(encode_latents(b, rt).glob("shard_*"))])
    torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
    tok = build_tokenizer(a, weights=a.run_dir() / "tokenizer.safetensors").eval()
    with torch.no_grad():
        mean = tok.encode_latent(_images(a)[1])
    assert not torch.allclose(za, mean, atol=1e-3)  # sampled, not the mean


def test_resume_keeps_finished_shards_and_redoes_stale_ones(tmp_path):
    cfg = _recipe(tmp_path)
    rt = setup_runtime("cpu", "fp32")
    out = encode_latents(cfg, rt)
    shards = sorted(out.glob("shard_*.safetensors"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    data_before = {p.name: {k: v.clone() for k, v in load_file(str(p)).items()} for p in shards}  # not mmapped
    shards[1].unlink()  # an interrupted run: one shard missing
    shards[2].write_bytes(b"truncated")  # and one half-written
    encode_latents(cfg, rt)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard_*.safetensors"))}
    assert after["shard_00000.safetensors"] == before["shard_00000.safetensors"]  # kept, not rewritten
    for name in ("shard_00001.safetensors", "shard_00002.safetensors"):
        redo = load_file(str(out / name))
        for key, value in data_before[name].items():
            torch.testing.assert_close(redo[key], value)  # identical content
    # Another tokenizer: the whole cache is re-encoded rather than mixed.
    other = build_tokenizer(cfg, weights=None)  # the same seeded start, then perturbed: other weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(other, cfg.run_dir() / "tokenizer.safetensors")
    encode_latents(cfg, rt)
    fresh = load_file(str(latents_dir(cfg) / "shard_00000.safetensors"))
    assert not torch.allclose(fresh["latents"], data_before["shard_00000.safetensors"]["latents"])


def _lightningdit_dataset_rows(directory, mean, std):
    """What LightningDiT's ImgLatentDataset hands its DiT, in a few lines following its code: every *.safetensors
    in sorted order, row i of each, normalised with latents_stats.pt ((1, C, 1, 1) mean and std, multiplier 1)."""
    import glob
    import os

    from safetensors import safe_open

    rows, flips, labels = [], [], []
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            n = f.get_slice("labels").get_shape()[0]
            for i in range(n):
                rows.append(((f.get_slice("latents")[i:i + 1] - mean) / std).squeeze(0))
                flips.append(((f.get_slice("latents_flip")[i:i + 1] - mean) / std).squeeze(0))
                labels.append(int(f.get_slice("labels")[i:i + 1].squeeze(0)))
    return torch.stack(rows), torch.stack(flips), labels


def test_our_cache_is_a_lightningdit_latent_folder(tmp_path):
    cfg = _recipe(tmp_path, sample_posterior=False)
    out = encode_latents(cfg, setup_runtime("cpu", "fp32"))
    stats = torch.load(out / "latents_stats.pt", weights_only=True)
    assert stats["mean"].shape == (1, 16, 1, 1) and stats["std"].shape == (1, 16, 1, 1)
    rows, flips, labels = _lightningdit_dataset_rows(str(out), stats["mean"], stats["std"])
    ours = LatentShards(out, random_flip=False)
    mean, std = load_stats(out)
    expected = torch.stack([(ours[i][0] - mean.view(-1, 1, 1)) / std.view(-1, 1, 1) for i in range(len(ours))])
    torch.testing.assert_close(rows, expected)
    assert labels == ours.labels.tolist() and flips.shape == rows.shape


def test_a_lightningdit_latent_folder_reads_as_a_cache(tmp_path):
    from safetensors.torch import save_file

    from ssr_cli.latent_cache import read_manifest
    from ssr_cli.models.lightningdit import write_stats

    # Written the way LightningDiT's extract_features does: shards of latents / latents_flip / labels, then stats.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 8, 4, 4, generator=gen)
    labels = torch.tensor([3, 0, 1, 4, 2, 1, 0])
    for k, (lo, hi) in enumerate([(0, 4), (4, 7)]):
        save_file({"latents": z[lo:hi], "latents_flip": z[lo:hi].flip(-1), "labels": labels[lo:hi]},
                  str(tmp_path / f"latents_rank00_shard{k:03d}.safetensors"))
    write_stats(tmp_path / "latents_stats.pt", z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
    manifest = read_manifest(tmp_path)
    assert manifest["latent_shape"] == [8, 4, 4] and manifest["num_classes"] == 5 and manifest["flip_copies"]
    data = LatentShards(tmp_path, random_flip=True)
    assert len(data) == 7 and data.labels.tolist() == labels.tolist()
    assert torch.equal(data[5][0], z[5])
    flipped = [seed for seed in range(20) if not torch.equal(data[(5, seed)][0], z[5])]
    assert flipped and all(torch.equal(data[(5, s)][0], z[5].flip(-1)) for s in flipped)
    mean, std = load_stats(tmp_path)
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
    # A folder that is neither says what was expected.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected manifest.json .* or a LightningDiT latent folder"):
        read_manifest(tmp_path / "empty")
    # A shard that is not safetensors (here a pickle) is one user error naming the file, not a traceback.
    from ssr_cli.models.weights import WeightsError

    (tmp_path / "bad").mkdir()
    torch.save({"latents": z}, tmp_path / "bad" / "latents_rank00_shard000.safetensors")
    write_stats(tmp_path / "bad" / "latents_stats.pt", z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
    with pytest.raises(WeightsError, match="latents_rank00_shard000.safetensors: expected a LightningDiT latent shard"):
        read_manifest(tmp_path / "bad")
