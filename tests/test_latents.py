"""encode-latents: shards hold exactly the tokenizer's latents; stats, resume and stale-cache handling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ssr_cli.data import build_dataset
from ssr_cli.engine import setup_runtime
from ssr_cli.finetune import build_tokenizer
from ssr_cli.latents import LatentShards, encode_latents, latents_dir, load_stats
from ssr_cli.models.weights import save_weights
from ssr_cli.recipe import from_dict

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
