"""data.source = "webdataset": shards written by webdataset's own ShardWriter read back exactly, in stream order."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ssr_cli.data import TarImages, WebDatasetShards, batch_source, build_dataset, transform_image
from ssr_cli.engine.runtime import step_seed
from ssr_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
N = 10


def _encoded(i: int) -> tuple[str, bytes]:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
    ext = "jpg" if i % 4 == 3 else "png"  # both image keys occur
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if ext == "jpg" else "PNG")
    return ext, buf.getvalue()


def _write_shards(folder, samples, maxcount=4):
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "shards-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return folder


@pytest.fixture
def shards(tmp_path):
    samples = []
    for i in range(N):
        ext, data = _encoded(i)
        samples.append({"__key__": f"img{i:04d}", ext: data, "cls": i % 3, "txt": f"caption {i}"})
    return _write_shards(tmp_path / "wds", samples), samples


def _direct(sample, size=16, **kw):
    ext = "jpg" if "jpg" in sample else "png"
    with Image.open(io.BytesIO(sample[ext])) as img:
        return transform_image(img, size, **kw)


@pytest.mark.parametrize("spec", ["folder", "braces", "file"])
def test_same_images_and_labels_as_the_files(shards, spec):
    folder, samples = shards
    assert sorted(p.name for p in folder.iterdir()) == [f"shards-{k:06d}.tar" for k in range(3)]
    path = {"folder": folder, "braces": folder / "shards-{000000..000002}.tar",
            "file": folder / "shards-000001.tar"}[spec]
    ds = build_dataset("webdataset", path=str(path), image_size=16)
    expected = samples[4:8] if spec == "file" else samples
    assert len(ds) == len(expected)
    assert ds.labels == [s["cls"] for s in expected]
    for i, sample in enumerate(expected):
        x, y = ds[(i, None)]
        assert torch.equal(x, _direct(sample)) and y == sample["cls"]
    # stream order = webdataset's own reader over the same shards (no shard shuffle)
    ours = [ds.samples[i][1] for i in range(len(ds))]
    urls = sorted(str(p) for p in folder.glob("*.tar")) if spec == "folder" else str(path)  # wds takes no folder
    theirs = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert ours == theirs


def test_recipe_needs_a_path_and_refuses_a_split():
    from ssr_cli.recipe import RecipeError, from_dict

    with pytest.raises(RecipeError, match="data.path must be set when data.source = 'webdataset'"):
        from_dict({"data": {"source": "webdataset"}})
    with pytest.raises(RecipeError, match="data.split applies to data.source = 'tar'"):
        from_dict({"data": {"source": "webdataset", "path": "shards", "split": "train"}})


def test_no_cls_means_one_class_and_bad_labels_are_one_line(tmp_path):
    plain = [{"__key__": f"a{i}", "png": _encoded(0)[1]} for i in range(3)]
    ds = WebDatasetShards(_write_shards(tmp_path / "plain", plain), 16)
    assert ds.labels == [0, 0, 0] and ds.classes == ["all"]
    mixed = [{"__key__": "a0", "png": _encoded(0)[1], "cls": 2}, {"__key__": "a1", "png": _encoded(0)[1]}]
    with pytest.raises(UserError, match="sample 'a1' has no .cls while others do"):
        WebDatasetShards(_write_shards(tmp_path / "mixed", mixed), 16)
    named = [{"__key__": "a0", "png": _encoded(0)[1], "cls": "dog"}]
    with pytest.raises(UserError, match="expected a non-negative integer class index"):
        WebDatasetShards(_write_shards(tmp_path / "named", named), 16)
    with pytest.raises(UserError, match="local files only"):
        WebDatasetShards("https://example.org/shards-{000000..000009}.tar", 16)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) not found: .*shards-000001.tar, .*\(\+4 more\)"):
        WebDatasetShards(str(tmp_path / "plain" / "shards-{000000..000007}.tar"), 16)


def test_corrupt_and_imageless_samples_are_counted_and_skipped(tmp_path):
    good = [{"__key__": f"ok{i}", "png": _encoded(i)[1], "cls": 1} for i in range(4)]
    broken = {"__key__": "broken", "jpg": b"\xff\xd8 this is not a jpeg", "cls": 1}
    imageless = {"__key__": "caption_only", "txt": "no image here", "cls": 1}
    folder = _write_shards(tmp_path / "bad", [good[0], broken, good[1], imageless, good[2], good[3]], maxcount=3)
    log = tmp_path / "unreadable.txt"
    ds = build_dataset("webdataset", path=str(folder), image_size=16, unreadable_log=log,
                       max_unreadable_fraction=0.5)
    assert len(ds) == 6
    with pytest.warns(UserWarning, match="broken.jpg"):
        x, _ = ds[(1, None)]
    assert torch.equal(x, _direct(good[1]))  # replaced by the next readable sample
    with pytest.warns(UserWarning, match="caption_only.<no image>"):
        x, _ = ds[(3, None)]
    assert torch.equal(x, _direct(good[2]))
    assert ds.bad == {1, 3}
    listed = log.read_text().splitlines()
    assert len(listed) == 2 and "broken.jpg" in listed[0] and "caption_only" in listed[1]
    strict = build_dataset("webdataset", path=str(folder), image_size=16, max_unreadable_fraction=0.1)
    with pytest.raises(UserError, match="1 of 6 images are unreadable"):  # (warned once per process, above)
        strict[(1, None)]


def test_seeded_stream_order_and_augmentation_match_the_tar_source(shards, tmp_path):
    folder, samples = shards
    kw = dict(image_size=16, resize=False, random_crop=True, random_flip=True)
    ds = build_dataset("webdataset", path=str(folder), **kw)

    def take(start, count):
        it = batch_source(ds, batch_per_rank=3, grad_accum=1, seed=5)(start)
        return [next(it) for _ in range(count)]

    first, again, resumed = take(0, 5), take(0, 5), take(2, 3)
    in_worker = next(batch_source(ds, batch_per_rank=3, grad_accum=1, seed=5, num_workers=1)(0))
    assert torch.equal(in_worker[0], first[0][0])  # the data set travels to a DataLoader worker process
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(first[2:], resumed):  # a resume at step 2 sees the batches an uninterrupted run sees
        assert torch.equal(a[0], b[0])
    labels = torch.cat([b[1] for b in first]).tolist()
    assert labels == [samples[p % N]["cls"] for p in range(15)]  # stream order, epoch after epoch
    # the same image under the same seed is cropped and flipped as the tar source does it
    tar_path = tmp_path / "plain.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, sample in enumerate(samples):
            ext = "jpg" if "jpg" in sample else "png"
            info = tarfile.TarInfo(f"c{sample['cls']}/img{i:04d}.{ext}")
            info.size = len(sample[ext])
            tf.addfile(info, io.BytesIO(sample[ext]))
    tar = TarImages(tar_path, **kw)
    rows = {name.split("/")[-1].split(".")[0]: j for j, (name, _, _) in enumerate(tar.members)}
    flips = 0
    for p in range(15):
        seed = step_seed(5, "aug", p)
        x = first[p // 3][0][p % 3]
        assert torch.equal(x, tar.load(rows[f"img{p % N:04d}"], seed)[0])
        flips += not torch.equal(x, ds.load(p % N, 12345)[0])
    assert flips > 0  # the seed matters


def test_encode_latents_reads_webdataset_shards(shards, tmp_path):
    from safetensors.torch import load_file

    from ssr_cli.engine.runtime import setup_runtime
    from ssr_cli.models.weights import save_weights
    from ssr_cli.recipe import from_dict
    from ssr_cli.stages.common import build_tokenizer
    from ssr_cli.stages.encode_latents import encode_latents

    folder, samples = shards
    cfg = from_dict({
        "run": {"name": "wds", "out_dir": str(tmp_path / "runs"), "device": "cpu", "precision": "fp32"},
        "data": {"source": "webdataset", "path": str(folder / "shards-{000000..000002}.tar"), "image_size": 16},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "none"},
        "latents": {"shard_size": 4, "stats_count": 6, "batch_size": 3, "sample_posterior": False},
    })
    torch.manual_seed(1)
    save_weights(build_tokenizer(cfg, weights=None), cfg.run_dir() / "tokenizer.safetensors")
    out = encode_latents(cfg, setup_runtime("cpu", "fp32"))
    rows = [load_file(str(p)) for p in sorted(out.glob("shard_*.safetensors"))]
    tok = build_tokenizer(cfg, weights=cfg.run_dir() / "tokenizer.safetensors").eval()
    images = torch.stack([_direct(s) for s in samples])
    with torch.no_grad():
        z = tok.encode_latent(images)
    torch.testing.assert_close(torch.cat([r["latents"] for r in rows]), z, rtol=1e-5, atol=1e-5)
    assert torch.cat([r["labels"] for r in rows]).tolist() == [s["cls"] for s in samples]


@pytest.mark.slow  # about 10 s on a loaded 2-core machine (the curves and grids a run draws included)
def test_a_tiny_finetune_trains_on_webdataset_shards(shards, tmp_path):
    from ssr_cli.engine.runtime import setup_runtime
    from ssr_cli.engine.progress import read_metrics
    from ssr_cli.recipe import from_dict
    from ssr_cli.stages.finetune import run_finetune

    folder, _ = shards
    cfg = from_dict({
        "run": {"name": "ft", "out_dir": str(tmp_path / "runs"), "device": "cpu", "precision": "fp32"},
        "data": {"source": "webdataset", "path": str(folder), "image_size": 16, "random_crop": True},
        "tokenizer": {"family": "kl-ae", "size": "tiny"},
        "regularizer": {"kind": "none"},
        "loss": {"lambda_lpips": 0.0},
        "train": {"steps": 3, "batch_size": 4, "ckpt_every_steps": 3, "log_every_steps": 1,
                  "image_every_steps": 100, "lr": 1e-3, "lr_min": 1e-5},
    })
    run_finetune(cfg, setup_runtime("cpu", "fp32"))
    assert (cfg.run_dir() / "tokenizer.safetensors").is_file()
    steps = [r["step"] for r in read_metrics(cfg.run_dir() / "finetune" / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 3
