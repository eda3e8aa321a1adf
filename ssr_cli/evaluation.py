"""``ssr evaluate``: reconstruction (PSNR, SSIM, LPIPS, rFID) and generation (FID, sFID, IS, precision,
recall, KID) metrics, printed as a table and written to ``<run>/eval.json``.

Reconstruction runs the (fine-tuned) tokenizer over an image set at a resolution (resize + center crop).
Generation compares the run's ``samples.npz`` (or any ADM-style batch) with a reference: an image folder
or tar, an ADM reference batch ``.npz``, or a statistics file made once with ``--make-ref``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from ssr_cli.data import build_dataset, ordered_batches
from ssr_cli.engine.progress import console, make_progress
from ssr_cli.engine.runtime import Runtime
from ssr_cli.recipe import Recipe
from ssr_cli.training import image_dataset

INCEPTION_HINT = (
    "set eval.inception_weights to the TF-Inception state dict "
    "(e.g. ../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth, or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth)"
)


def load_inception(cfg: Recipe, device: torch.device):
    """The Inception extractor, or None (with the reason) when no weights are configured."""
    from ssr_cli.metrics import InceptionFeatures

    path = cfg.eval.inception_weights
    if not path:
        return None, f"no Inception weights: {INCEPTION_HINT}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.inception_weights file not found: {path}; {INCEPTION_HINT}")
    return InceptionFeatures(path, device=device), None


def _lpips(cfg: Recipe, device: torch.device):
    from ssr_cli.metrics import load_lpips

    path = cfg.eval.lpips_weights
    if not path:
        return None, "no LPIPS weights: set eval.lpips_weights (e.g. ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.lpips_weights file not found: {path}")
    return load_lpips(cfg.eval.lpips_net, path, device=device), None


def image_set(cfg: Recipe, source: str | None, split: str | None, size: int, limit: int | None):
    """A data set from a path (folder or .tar), or the recipe's [data] when ``source`` is None."""
    if source is None:
        ds = image_dataset(cfg, augment=False, image_size=size)
    else:
        kind = "tar" if source.endswith(".tar") else "folder"
        ds = build_dataset(kind, path=source, split=split, image_size=size)
    n = len(ds) if limit is None else min(limit, len(ds))
    return ds, n


def _uint8_batches(ds, n: int, batch_size: int, label: str):
    from ssr_cli.metrics import to_uint8

    with make_progress() as progress:
        task = progress.add_task(label, total=n, status="", rate="")
        for images, _, _ in ordered_batches(ds, batch_size, limit=n):
            progress.update(task, advance=images.shape[0])
            yield to_uint8(images)


@torch.no_grad()
def reconstruction(cfg: Recipe, rt: Runtime, *, weights: str | None = None) -> dict:
    from ssr_cli.finetune import build_tokenizer, load_tokenizer_for_run
    from ssr_cli.metrics import FeatureAccumulator, frechet_distance, reconstruction_metrics, to_uint8

    e = cfg.eval
    size = e.image_size or cfg.data.image_size
    if weights is not None:
        tokenizer, source = build_tokenizer(cfg, weights=weights), weights
    else:
        tokenizer, source = load_tokenizer_for_run(cfg)
    tokenizer = tokenizer.to(rt.device).eval()
    ds, n = image_set(cfg, e.images, e.images_split, size, e.num_images)
    lpips_model, lpips_note = _lpips(cfg, rt.device)
    inception, inception_note = load_inception(cfg, rt.device)
    acc_real = FeatureAccumulator(keep=(), stats=("pool",)) if inception else None
    acc_recon = FeatureAccumulator(keep=(), stats=("pool",)) if inception else None
    per_image: dict[str, list[np.ndarray]] = {}
    with make_progress() as progress:
        task = progress.add_task("evaluate: reconstruction", total=n, status="", rate="")
        for images, _, _ in ordered_batches(ds, e.batch_size, limit=n):
            x = images.to(rt.device)
            with rt.autocast():
                recon = tokenizer.decode(tokenizer.encode_latent(x))
            recon = recon.float().clamp(-1, 1)
            for key, value in reconstruction_metrics(x, recon, lpips_model).items():
                per_image.setdefault(key, []).append(value)
            if inception:
                acc_real.update(inception(to_uint8(x)))
                acc_recon.update(inception(to_uint8(recon)))
            progress.update(task, advance=x.shape[0])
    out: dict = {"tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}", "weights": str(source) if source else None,
                 "num_images": n, "resolution": size, "unavailable": {}}
    for key, chunks in per_image.items():
        values = np.concatenate(chunks)
        finite = values[np.isfinite(values)]
        out[key] = float(finite.mean()) if finite.size else float("inf")
    out["ssim_data_range"] = 255
    if lpips_model is None:
        out["lpips"] = None
        out["unavailable"]["lpips"] = lpips_note
    if inception:
        if n < 2:
            out["rfid"] = None
            out["unavailable"]["rfid"] = "rFID needs at least 2 images"
        else:
            out["rfid"] = frechet_distance(*acc_recon.stats("pool"), *acc_real.stats("pool"))
    else:
        out["rfid"] = None
        out["unavailable"]["rfid"] = inception_note
    return out


def reference_stats(cfg: Recipe, inception, resolution: int):
    """The FID reference as :class:`ssr_cli.metrics.ReferenceStats`."""
    from ssr_cli.metrics import ReferenceStats, extract_features, load_reference

    e = cfg.eval
    if e.reference and e.reference.endswith(".npz"):
        return load_reference(e.reference, extractor=inception, batch_size=e.batch_size)
    ds, n = image_set(cfg, e.reference, e.reference_split, resolution, e.num_reference_images)
    feats = extract_features(_uint8_batches(ds, n, e.batch_size, "evaluate: reference features"), inception,
                             batch_size=e.batch_size, keep=("pool",))
    return ReferenceStats(mu=feats["mu"], sigma=feats["sigma"], mu_s=feats["mu_s"], sigma_s=feats["sigma_s"],
                          pool=feats["pool"], num_images=n, source=e.reference or f"[data] {cfg.data.source}")


def generation(cfg: Recipe, rt: Runtime, samples: Path) -> dict:
    from ssr_cli.metrics import compute_generation_metrics, extract_features

    inception, note = load_inception(cfg, rt.device)
    if inception is None:
        raise FileNotFoundError(f"generation metrics need Inception weights: {note}")
    with np.load(samples) as f:
        images = f["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{samples}: arr_0 must be uint8 NHWC images, got {images.dtype} {images.shape}")
    bs = cfg.eval.batch_size
    batches = (torch.from_numpy(images[i:i + bs]).permute(0, 3, 1, 2) for i in range(0, len(images), bs))
    fake = extract_features(batches, inception, batch_size=bs)
    ref = reference_stats(cfg, inception, resolution=images.shape[1])
    m = compute_generation_metrics(fake, ref, inception.fc_is_zero, kid_subsets=cfg.eval.kid_subsets,
                                   kid_subset_size=cfg.eval.kid_subset_size, seed=cfg.run.seed)
    m["samples"] = str(samples)
    m["reference"] = ref.source
    m["reference_images"] = ref.num_images
    return m


def make_reference(cfg: Recipe, rt: Runtime, out: Path) -> Path:
    """Compute and save reference statistics (for later `eval.reference = <out>`)."""
    from ssr_cli.metrics import save_reference_stats

    inception, note = load_inception(cfg, rt.device)
    if inception is None:
        raise FileNotFoundError(f"--make-ref needs Inception weights: {note}")
    size = cfg.eval.image_size or cfg.data.image_size
    ref = reference_stats(cfg, inception, resolution=size)
    path = save_reference_stats(out, {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s,
                                      "pool": ref.pool})
    console.print(f"[green]reference statistics of {ref.num_images} images ({ref.source}, {size}²) written to {path}")
    return path


def run_evaluate(cfg: Recipe, rt: Runtime, *, gfid: bool | None = None, samples: Path | None = None,
                 weights: str | None = None, out: Path | None = None) -> dict:
    """Reconstruction and/or generation metrics; ``gfid`` None: generation when samples exist."""
    from ssr_cli.generate import samples_dir

    from ssr_cli.vae_train import is_vae_family

    if is_vae_family(cfg):
        from ssr_cli.vae_train import evaluate_vae, print_vae_table

        result = {}
        if rt.is_main:
            path = Path(out) if out else cfg.run_dir() / "eval.json"
            result = evaluate_vae(cfg, rt, weights=weights, out=path)
            print_vae_table({cfg.run.name: result}, title=f"ssr evaluate: {cfg.tokenizer.family}")
            console.print(f"metrics written to {path}")
        rt.barrier()
        return result
    result: dict = {}
    if rt.is_main:
        if cfg.eval.reconstruction:
            result["reconstruction"] = reconstruction(cfg, rt, weights=weights)
        samples = Path(samples) if samples else samples_dir(cfg) / "samples.npz"
        want = cfg.eval.generation if gfid is None else gfid
        if want:
            if samples.is_file() and (gfid or cfg.eval.inception_weights):
                result["generation"] = generation(cfg, rt, samples)
            elif samples.is_file():
                result["generation"] = {"unavailable": {"all": f"no Inception weights: {INCEPTION_HINT}"}}
            elif gfid:
                raise FileNotFoundError(f"no samples at {samples}; run `ssr sample` first or pass --samples")
            else:
                result["generation"] = {"unavailable": {"all": f"no samples at {samples} (run `ssr sample`)"}}
        path = Path(out) if out else cfg.run_dir() / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(result), indent=2))
        print_table(result)
        console.print(f"metrics written to {path}")
    rt.barrier()
    return result


COMPARE_KEYS = {
    "reconstruction": ("psnr", "ssim", "lpips", "rfid"),
    "generation": ("fid", "sfid", "inception_score", "precision", "recall", "kid"),
}


def print_comparison(results: dict[str, dict]) -> None:
    """One column per run (label -> run_evaluate result): the headline metrics side by side."""
    if all("psnr" in r and "reconstruction" not in r for r in results.values()):
        from ssr_cli.vae_train import print_vae_table

        print_vae_table(results, title="ssr evaluate: comparison")
        return
    table = Table(title="ssr evaluate: comparison")
    table.add_column("metric")
    for label in results:
        table.add_column(label, justify="right")
    for part, keys in COMPARE_KEYS.items():
        for key in keys:
            values = [r.get(part, {}).get(key) for r in results.values()]
            if all(v is None for v in values):
                continue
            table.add_row(f"{part} {LABELS[key]}",
                          *(f"{v:.4f}" if isinstance(v, float) else "[dim]unavailable" for v in values))
    console.print(table)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


LABELS = {
    "psnr": "PSNR (dB, uint8)", "ssim": "SSIM (data range 255)", "lpips": "LPIPS", "rfid": "rFID",
    "fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "precision",
    "recall": "recall", "kid": "KID",
}


def print_table(result: dict) -> None:
    table = Table(title="ssr evaluate")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for part, metrics in result.items():
        unavailable = metrics.get("unavailable", {})
        for key, label in LABELS.items():
            if key in metrics or key in unavailable:
                value = metrics.get(key)
                text = f"{value:.4f}" if isinstance(value, float) else f"[dim]unavailable: {unavailable.get(key, '')}"
                table.add_row(part, label, text)
        if "num_images" in metrics:
            table.add_row(part, "images", str(metrics["num_images"]))
        if "all" in unavailable:
            table.add_row(part, "-", f"[dim]{unavailable['all']}")
    console.print(table)
