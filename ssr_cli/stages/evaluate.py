"""``ssr evaluate``: reconstruction (PSNR, SSIM, LPIPS, rFID; for KL tokenizers the KL of the raw posterior in
nats per image) and generation (FID, sFID, IS, precision, recall, KID) metrics, printed as a table and written
to ``<run>/eval.json``.

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

from ssr_cli import __version__
from ssr_cli.data import build_dataset, ordered_batches, take_subset
from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.progress import console, make_progress, print_result_table
from ssr_cli.engine.runtime import Runtime, step_seed
from ssr_cli.errors import UserError, UserFileNotFoundError, UserValueError
from ssr_cli.inputs import file_sha256, settings
from ssr_cli.metrics import (
    REFERENCE_FORMAT,
    SPATIAL_ROWS_MAX,
    FeatureAccumulator,
    PoolFeatureCache,
    ReferenceStats,
    compute_generation_metrics,
    extract_features,
    frechet_distance,
    frechet_distance_of_rows,
    load_reference,
    reconstruction_metrics,
    to_uint8,
)
from ssr_cli.models.tokenizer import DiagonalGaussian, latent_of
from ssr_cli.npz import NpzWriter, check_images, iter_npz_batches, npz_array_info, npz_keys
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    INCEPTION_HINT,
    build_tokenizer,
    image_dataset,
    is_vae_family,
    load_inception,
    load_tokenizer_for_run,
    recorded,
    samples_dir,
    shared_lpips,
    tokenizer_sha256,
)
from ssr_cli.vae_objective import kl_per_dim, nelbo


def _lpips(cfg: Recipe, device: torch.device):
    path = cfg.eval.lpips_weights
    if not path:
        return None, "no LPIPS weights: set eval.lpips_weights (e.g. ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth)"
    if not Path(path).is_file():
        raise UserFileNotFoundError(f"eval.lpips_weights file not found: {path}")
    return shared_lpips(cfg.eval.lpips_net, path, device), None


def image_subset(cfg: Recipe, source: str | None, split: str | None, size: int, limit: int | None):
    """``(dataset, n, record)``: a path (folder or .tar), or the recipe's [data] when ``source`` is None, cut to
    ``limit`` images by ``eval.subset`` (seeded, class-stratified by default); ``record`` describes the choice."""
    if source is None:
        ds = image_dataset(cfg, augment=False, image_size=size)
    else:
        kind = "tar" if source.endswith(".tar") else "folder"
        ds = build_dataset(kind, path=source, split=split, image_size=size)
    ds, record = take_subset(ds, limit, seed=cfg.eval.subset_seed, rule=cfg.eval.subset)
    return ds, len(ds), record


def image_set(cfg: Recipe, source: str | None, split: str | None, size: int, limit: int | None):
    """:func:`image_subset` without the record."""
    return image_subset(cfg, source, split, size, limit)[:2]


def _uint8_batches(ds, n: int, batch_size: int, label: str):
    with make_progress() as progress:
        task = progress.add_task(label, total=n, status="", rate="")
        for images, _, _ in ordered_batches(ds, batch_size, limit=n):
            progress.update(task, advance=images.shape[0])
            yield to_uint8(images)


def _npz_batches(path: Path, batch_size: int, label: str):
    """uint8 NCHW tensors of an ADM batch's ``arr_0``, streamed (see :mod:`ssr_cli.npz`)."""
    n = npz_array_info(path)[0][0]
    with make_progress() as progress:
        task = progress.add_task(label, total=n, status="", rate="")
        for rows in iter_npz_batches(path, batch_size=batch_size):
            progress.update(task, advance=rows.shape[0])
            yield torch.from_numpy(rows).permute(0, 3, 1, 2)


RFID_ROWS_MAX = 2048
"""Up to this many images, the rFID accumulators also keep their pool rows (float32, at most 16 MiB per set)
and the Fréchet distance is computed from them (:func:`_fid_of`: the same number, much less work)."""


def _rows_for_rfid(n: int) -> tuple[str, ...]:
    return ("pool",) if n <= RFID_ROWS_MAX else ()


def _fid_of(acc_a, acc_b) -> float:
    """Fréchet distance between two accumulators' pool features: from their kept rows when both kept them
    (:func:`frechet_distance_of_rows`), else from their running statistics."""
    if "pool" in acc_a.keep and "pool" in acc_b.keep:
        return frechet_distance_of_rows(acc_a.features()["pool"], acc_b.features()["pool"])
    return frechet_distance(*acc_a.stats("pool"), *acc_b.stats("pool"))


def paired_rfid(acc_originals, acc_recons, ids_originals: list[int], ids_recons: list[int]) -> float:
    """rFID of reconstructions against their own originals, and only those: the two feature sets must come
    from the same image indices in the same order (never a generation reference batch)."""
    if ids_originals != ids_recons or acc_originals.num_images != acc_recons.num_images:
        raise RuntimeError("rFID needs the originals of exactly the reconstructed images as its reference "
                           f"({len(ids_originals)} originals vs {len(ids_recons)} reconstructions, different ids)")
    return _fid_of(acc_recons, acc_originals)


def posterior_kl(posterior) -> np.ndarray | None:
    """KL(q‖N(0, I)) per image in nats, summed over the latent elements, of the raw (unscaled, unshifted)
    posterior (paper Fig. 4(b); :meth:`DiagonalGaussian.kl`), computed in float32 whatever the autocast dtype;
    None for a deterministic tokenizer (a tensor latent)."""
    if not isinstance(posterior, DiagonalGaussian):
        return None
    raw = DiagonalGaussian(posterior.mean.float(), posterior.logvar.float(), scale=posterior.scale,
                           shift=posterior.shift)
    return raw.kl().double().cpu().numpy()


@torch.no_grad()
def reconstruction(cfg: Recipe, rt: Runtime, *, weights: str | None = None) -> dict:
    e = cfg.eval
    size = e.image_size or cfg.data.image_size
    if weights is not None:
        tokenizer, source = build_tokenizer(cfg, weights=weights), weights
    else:
        tokenizer, source = load_tokenizer_for_run(cfg)
    tokenizer = tokenizer.to(rt.device).eval()
    ds, n, subset = image_subset(cfg, e.images, e.images_split, size, e.num_images)
    lpips_model, lpips_note = _lpips(cfg, rt.device)
    inception, inception_note = load_inception(cfg, rt.device)
    keep = _rows_for_rfid(n)
    acc_real = FeatureAccumulator(keep=keep, stats=("pool",), rows_dtype=np.float32) if inception else None
    acc_recon = FeatureAccumulator(keep=keep, stats=("pool",), rows_dtype=np.float32) if inception else None
    # the originals are the same images in every evaluation of a study: their features are cached (small sets only)
    cache = PoolFeatureCache.of(Path(cfg.run.out_dir) / ".cache" / "inception" if n <= RFID_ROWS_MAX else None,
                                inception, e.batch_size) if inception else None
    per_image: dict[str, list[np.ndarray]] = {}
    ids_real: list[int] = []
    ids_recon: list[int] = []
    with make_progress() as progress:
        task = progress.add_task("evaluate: reconstruction", total=n, status="", rate="")
        for images, _, indices in ordered_batches(ds, e.batch_size, limit=n):
            x = images.to(rt.device)
            with rt.autocast():
                posterior = tokenizer.encode(x)
                recon = tokenizer.decode(latent_of(posterior))
            recon = recon.float().clamp(-1, 1)
            for key, value in reconstruction_metrics(x, recon, lpips_model).items():
                per_image.setdefault(key, []).append(value)
            kl = posterior_kl(posterior)
            if kl is not None:
                per_image.setdefault("kl", []).append(kl)
            if inception:
                real = to_uint8(x)
                acc_real.update({"pool": cache.rows(real, lambda u8: inception(u8)["pool"])})
                ids_real.extend(indices.tolist())
                acc_recon.update(inception(to_uint8(recon)))
                ids_recon.extend(indices.tolist())
            progress.update(task, advance=x.shape[0])
    out: dict = {"tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}", "weights": str(source) if source else None,
                 "num_images": n, "resolution": size, "unavailable": {}}
    out["protocol"] = {"images": e.images or f"[data] {cfg.data.source} {cfg.data.path or ''}".strip(),
                       "images_sha256": _sha256_or_none(e.images), "num_images": n, "resolution": size,
                       "subset": subset, "quantize": "round", "rfid_reference": f"the {n} originals of the "
                       "reconstructed images", "evaluator": evaluator_version()}
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
            out["rfid"] = paired_rfid(acc_real, acc_recon, ids_real, ids_recon)
    else:
        out["rfid"] = None
        out["unavailable"]["rfid"] = inception_note
    return out


def evaluator_version() -> str:
    """What computed the numbers: this package's version and the feature protocol."""
    return f"ssr {__version__}: ADM evaluator protocol (TF Inception 2015-12-05, pool_3 + mixed_6/conv, float64 stats)"


def _sha256_or_none(path: str | None) -> str | None:
    return file_sha256(path) if path and Path(path).is_file() else None


def reference_stats(cfg: Recipe, inception, resolution: int, sink=None):
    """The FID reference as :class:`ssr_cli.metrics.ReferenceStats` (``subset`` set on it: the subset record of
    a folder/tar/[data] reference, None for a .npz). ``sink(uint8 NCHW batch)`` sees every reference image."""
    e = cfg.eval
    if e.reference and e.reference.endswith(".npz"):
        return load_reference(e.reference, extractor=inception, batch_size=e.batch_size)
    ds, n, subset = image_subset(cfg, e.reference, e.reference_split, resolution, e.num_reference_images)
    batches = _uint8_batches(ds, n, e.batch_size, "evaluate: reference features")
    if sink is not None:
        batches = (sink(b) or b for b in batches)
    keep = ("pool", "spatial") if n <= SPATIAL_ROWS_MAX else ("pool",)
    feats = extract_features(batches, inception, batch_size=e.batch_size, keep=keep, rows_dtype=np.float32)
    return ReferenceStats(mu=feats["mu"], sigma=feats["sigma"], mu_s=feats["mu_s"], sigma_s=feats["sigma_s"],
                          pool=feats["pool"], num_images=n, source=e.reference or f"[data] {cfg.data.source}",
                          subset=subset, spatial=feats.get("spatial"))


SAMPLES_SIDECAR = "samples.json"


def samples_protocol(samples: Path, labels: np.ndarray | None) -> dict:
    """How the samples were made: ``samples.json`` beside the .npz (written by ``ssr sample``), else unknown;
    the label protocol is checked against ``arr_1`` when the batch carries labels."""
    sidecar = samples.with_name(SAMPLES_SIDECAR)
    made = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    keys = ("labels", "sampler", "steps", "shift", "cfg_scale", "cfg_interval", "seed", "quantize")
    out = {k: made.get(k, "unknown") for k in keys}
    if labels is not None and len(labels):
        counts = np.bincount(labels.astype(np.int64))
        counts = counts[counts > 0]
        out["label_counts"] = {"classes": int(len(counts)), "min": int(counts.min()), "max": int(counts.max())}
        if out["labels"] == "unknown":
            out["labels"] = "balanced" if counts.min() == counts.max() else "uniform"
    if not made:
        out["note"] = f"no {SAMPLES_SIDECAR} beside {samples.name}: sampling settings unknown"
    return out


def generation(cfg: Recipe, rt: Runtime, samples: Path, inception=None) -> dict:
    """Generation metrics of an ADM batch against ``eval.reference``, both streamed in ``eval.batch_size``
    chunks. ``inception``: a feature extractor like :class:`ssr_cli.metrics.InceptionFeatures` (default: the
    one of ``eval.inception_weights``)."""
    if inception is None:
        inception, note = load_inception(cfg, rt.device)
        if inception is None:
            raise UserFileNotFoundError(f"generation metrics need Inception weights: {note}")
    samples = Path(samples)
    shape, dtype = npz_array_info(samples)
    check_images(samples, shape, dtype)
    labels = None
    if "arr_1" in npz_keys(samples):
        npz_array_info(samples, "arr_1")  # plain numbers (NpzError otherwise): np.load would refuse an object array
        with np.load(samples) as f:
            labels = f["arr_1"]
    bs = cfg.eval.batch_size
    ref = reference_stats(cfg, inception, resolution=shape[1])  # first: a bad reference fails before the samples' pass
    # Rows kept: pool (precision/recall, KID) and logits (IS), float32 (lossless); spatial as running stats, and
    # as rows too for a small set (its sFID against a small reference then skips the 2023² eigendecompositions).
    keep = ("pool", "logits", "spatial") if shape[0] <= SPATIAL_ROWS_MAX else ("pool", "logits")
    fake = extract_features(_npz_batches(samples, bs, "evaluate: sample features"), inception, batch_size=bs,
                            keep=keep, rows_dtype=np.float32)
    m = compute_generation_metrics(fake, ref, inception.fc_is_zero, kid_subsets=cfg.eval.kid_subsets,
                                   kid_subset_size=cfg.eval.kid_subset_size, seed=cfg.run.seed)
    m["samples"] = str(samples)
    m["reference"] = ref.source
    m["reference_images"] = ref.num_images
    ref_file = cfg.eval.reference if cfg.eval.reference and Path(cfg.eval.reference).is_file() else None
    m["protocol"] = {
        "num_samples": int(shape[0]), "resolution": int(shape[1]), **samples_protocol(samples, labels),
        "reference": ref.source, "reference_sha256": _sha256_or_none(ref_file), "reference_images": ref.num_images,
        "reference_subset": ref.subset, "evaluator": evaluator_version(),
        "inception_weights_sha256": _sha256_or_none(cfg.eval.inception_weights),
    }
    return m


def make_reference(cfg: Recipe, rt: Runtime, out: Path) -> Path:
    """Reference batch for later ``eval.reference = <out>``, in ADM's layout: ``arr_0`` (the reference images,
    uint8 NHWC, rounding quantisation), ``mu``/``sigma``/``mu_s``/``sigma_s`` (float64) — what ADM's evaluator
    reads — plus ours: ``pool`` rows (float32, precision/recall/KID), ``spatial`` rows for at most
    :data:`SPATIAL_ROWS_MAX` images (float32, a cheaper sFID), ``num_images``, ``format``, ``subset``."""
    inception, note = load_inception(cfg, rt.device)
    if inception is None:
        raise UserFileNotFoundError(f"--make-ref needs Inception weights: {note}")
    e = cfg.eval
    if e.reference and e.reference.endswith(".npz"):
        raise UserValueError(f"--make-ref reads images (a folder, a .tar or [data]); eval.reference is already a "
                             f"reference batch: {e.reference}")
    size = e.image_size or cfg.data.image_size
    n = image_subset(cfg, e.reference, e.reference_split, size, e.num_reference_images)[1]
    with NpzWriter(out) as writer:
        writer.add_stream("arr_0", (n, size, size, 3), np.uint8)
        ref = reference_stats(cfg, inception, resolution=size,
                              sink=lambda b: writer.write("arr_0", b.permute(0, 2, 3, 1).numpy()))
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            writer.add(key, np.asarray(getattr(ref, key), dtype=np.float64))
        writer.add("pool", np.asarray(ref.pool, dtype=np.float32))
        if ref.spatial is not None:
            writer.add("spatial", np.asarray(ref.spatial, dtype=np.float32))
        writer.add("num_images", np.asarray(n, dtype=np.int64))
        writer.add("format", np.asarray(REFERENCE_FORMAT))
        writer.add("subset", np.asarray(json.dumps({"source": ref.source, "resolution": size, **ref.subset})))
    from rich.markup import escape

    console.print(f"[green]reference batch of {ref.num_images} images ({escape(ref.source)}, {size}², subset "
                  f"{ref.subset['rule']}) written to {out}: arr_0 + mu/sigma/mu_s/sigma_s, readable by ADM's evaluator")
    return Path(out)


def run_evaluate(cfg: Recipe, rt: Runtime, *, gfid: bool | None = None, samples: Path | None = None,
                 weights: str | None = None, out: Path | None = None) -> dict:
    """Reconstruction and/or generation metrics; ``gfid`` None: generation when samples exist."""
    if is_vae_family(cfg):
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
                raise UserFileNotFoundError(f"no samples at {samples}; run `ssr sample` first or pass --samples")
            else:
                result["generation"] = {"unavailable": {"all": f"no samples at {samples} (run `ssr sample`)"}}
        path = Path(out) if out else cfg.run_dir() / "eval.json"
        write_json_atomic(path, _jsonable(result), indent=2)
        print_table(result)
        console.print(f"metrics written to {path}")
    rt.barrier()
    return result


HEADLINE_METRICS = {
    "reconstruction": ("psnr", "ssim", "lpips", "rfid", "kl"),
    "generation": ("fid", "sfid", "inception_score", "precision", "recall", "kid"),
}
"""The eval.json numbers compared across runs and summarised by the pipeline, per part, in table order."""


# Recorded but not part of what must match: a different seed is a repeat of the same protocol.
PROTOCOL_IGNORED = ("seed", "note", "label_counts")


def protocol_differences(results: dict[str, dict]) -> list[str]:
    """Protocol fields (eval.json ``<part>.protocol``) in which the compared runs differ, one line each, for the
    parts that carry numbers; file paths count only where the files have no hash to compare."""
    lines = []
    for part in HEADLINE_METRICS:
        protocols = {label: r[part]["protocol"] for label, r in results.items()
                     if isinstance(r.get(part), dict) and "protocol" in r[part]}
        if len(protocols) < 2:
            continue
        keys = sorted({k for p in protocols.values() for k in p} - set(PROTOCOL_IGNORED))
        for key in keys:
            if key in ("reference", "images") and all(p.get(f"{key}_sha256") for p in protocols.values()):
                continue
            values = {label: p.get(key, "unrecorded") for label, p in protocols.items()}
            if len({json.dumps(_jsonable(v), sort_keys=True) for v in values.values()}) > 1:
                shown = ", ".join(f"{label}: {json.dumps(_jsonable(v))}" for label, v in values.items())
                lines.append(f"{part} {key} ({shown})")
    return lines


def check_protocols(results: dict[str, dict], allow_mixed: bool = False) -> list[str]:
    """Refuse (UserError) to compare runs evaluated under different protocols unless ``allow_mixed``."""
    diffs = protocol_differences(results)
    if diffs and not allow_mixed:
        raise UserError("the compared runs were evaluated under different protocols: " + "; ".join(diffs)
                        + ". Re-evaluate them alike, or pass --mixed-protocols to show them side by side anyway")
    return diffs


def print_comparison(results: dict[str, dict]) -> None:
    """One column per run (label -> run_evaluate result): the headline metrics side by side."""
    if all("psnr" in r and "reconstruction" not in r for r in results.values()):
        print_vae_table(results, title="ssr evaluate: comparison")
        return
    table_rows = []
    for part, keys in HEADLINE_METRICS.items():
        for key in keys:
            values = [r.get(part, {}).get(key) for r in results.values()]
            if all(v is None for v in values):
                continue
            table_rows.append((f"{part} {LABELS[key]}",
                               *(f"{v:.4f}" if isinstance(v, float) else "[dim]unavailable" for v in values)))
        rows = [dict(protocol_rows((r.get(part) or {}).get("protocol"))) for r in results.values()]
        for label in dict.fromkeys(k for row in rows for k in row):
            table_rows.append((f"{part} {label}", *(row.get(label, "[dim]unrecorded") for row in rows)))
    print_result_table("ssr evaluate: comparison", ["metric"], list(results), table_rows)


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
    "kl": "KL (nats/image, raw posterior)",
    "fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "precision",
    "recall": "recall", "kid": "KID",
}


def protocol_rows(protocol: dict | None) -> list[tuple[str, str]]:
    """The protocol facts every table states: labels, quantisation, reference and subset rule."""
    if not protocol:
        return []
    rows = []
    if "labels" in protocol:
        rows.append(("sample labels", str(protocol["labels"])))
    if "quantize" in protocol:
        rows.append(("quantisation", str(protocol["quantize"])))
    if "reference" in protocol:
        sha = protocol.get("reference_sha256")
        rows.append(("reference", f"{protocol['reference']}" + (f" (sha256 {sha[:12]})" if sha else "")))
    subset = protocol.get("reference_subset", protocol.get("subset"))
    if subset:
        rows.append(("subset", f"{subset['rule']} {subset['count']}/{subset['of']}, {subset['classes']} classes"))
    if "rfid_reference" in protocol:
        rows.append(("rFID reference", protocol["rfid_reference"]))
    from rich.markup import escape

    return [(label, escape(text)) for label, text in rows]  # "[data] ..." is text, not markup


def print_table(result: dict) -> None:
    print_result_table("ssr evaluate", ["set", "metric"], ["value"], _result_rows(result))


def _result_rows(result: dict):
    for part, metrics in result.items():
        unavailable = metrics.get("unavailable", {})
        for key, label in LABELS.items():
            if key in metrics or key in unavailable:
                value = metrics.get(key)
                text = f"{value:.4f}" if isinstance(value, float) else f"[dim]unavailable: {unavailable.get(key, '')}"
                yield part, label, text
        if "num_images" in metrics:
            yield part, "images", str(metrics["num_images"])
        for label, text in protocol_rows(metrics.get("protocol")):
            yield part, label, text
        if "all" in unavailable:
            yield part, "-", f"[dim]{unavailable['all']}"


# ------------------------------------------------------------------------------- the vector-latent VAEs


@torch.no_grad()
def evaluate_vae(cfg: Recipe, rt: Runtime, *, weights: str | Path | None = None, out: Path | None = None) -> dict:
    """Metrics of the run's VAE (``weights`` overrides the file) on ``eval.num_images`` images.

    Images: ``eval.images`` (folder / .tar) or the recipe's [data] without augmentation, at data.image_size.
    Returns psnr / ssim (reconstruction from the posterior mean, uint8, dB / data range 255), nelbo, rec, kl
    (nats per image, one posterior sample with a fixed seed, [−1, 1] pixel units as in training),
    nelbo_per_dim, active_dims (KL > collapse threshold), and — with eval.inception_weights — fid_prior (as many
    prior samples as images, against the images) and rfid (reconstructions against the images); a metric
    that cannot be computed is None with its reason in ``unavailable``. Also written to ``out`` (JSON) if given.
    """
    if weights is not None:
        vae, source = build_tokenizer(cfg, weights=weights), weights
    else:
        vae, source = load_tokenizer_for_run(cfg)
    vae = vae.to(rt.device).eval()
    ds, n = image_set(cfg, cfg.eval.images, cfg.eval.images_split, cfg.data.image_size, cfg.eval.num_images)
    inception, note = load_inception(cfg, rt.device)
    keep = _rows_for_rfid(n)
    accs = {k: FeatureAccumulator(keep=keep, stats=("pool",), rows_dtype=np.float32)
            for k in ("data", "recon", "prior")} if inception else {}
    gen = torch.Generator(device=rt.device).manual_seed(step_seed(cfg.run.seed, "eval-nelbo"))
    prior_gen = torch.Generator().manual_seed(step_seed(cfg.run.seed, "eval-prior"))
    sums = {"nelbo": 0.0, "rec": 0.0, "kl": 0.0, "mse": 0.0}
    per_image: dict[str, list] = {"psnr": [], "ssim": []}
    kl_dims = None
    for images, _, _ in ordered_batches(ds, cfg.eval.batch_size, limit=n):
        x = images.to(rt.device)
        b = x.shape[0]
        terms = nelbo(vae, x, generator=gen)
        for k in sums:
            sums[k] += float(terms[k]) * b
        post = vae.encode(x)
        dims = kl_per_dim(post) * b
        kl_dims = dims if kl_dims is None else kl_dims + dims
        recon = vae.decode(post.mean).float().clamp(-1, 1)
        metrics = reconstruction_metrics(x, recon)
        per_image["psnr"].extend(metrics["psnr"].tolist())
        per_image["ssim"].extend(metrics["ssim"].tolist())
        if inception:
            prior = vae.sample_prior(b, generator=prior_gen).float()
            accs["data"].update(inception(to_uint8(x)))
            accs["recon"].update(inception(to_uint8(recon)))
            accs["prior"].update(inception(to_uint8(prior)))
    result: dict = {
        "tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}",
        "weights": str(source) if source else None,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "num_images": n,
        "resolution": cfg.data.image_size,
        "psnr": float(torch.tensor(per_image["psnr"]).clamp(max=100).mean()),
        "ssim": float(torch.tensor(per_image["ssim"]).mean()),
        **{k: v / n for k, v in sums.items()},
        "unavailable": {},
    }
    result["nelbo_per_dim"] = result["nelbo"] / (3 * cfg.data.image_size**2)
    kl_dims = kl_dims / n
    result["active_dims"] = int((kl_dims > cfg.vae.collapse_threshold).sum())
    result["latent_dims"] = int(kl_dims.numel())
    if inception and n >= 2:
        result["fid_prior"] = _fid_of(accs["prior"], accs["data"])
        result["rfid"] = _fid_of(accs["recon"], accs["data"])
    else:
        result["fid_prior"] = result["rfid"] = None
        reason = note or "FID needs at least 2 images"
        result["unavailable"].update(fid_prior=reason, rfid=reason)
    if out is not None and rt.is_main:
        write_json_atomic(out, result, indent=2)
    return result


VAE_LABELS = {
    "nelbo": "NELBO (nats/image)", "rec": "REC −log p(x|z)", "kl": "KL (nats)", "nelbo_per_dim": "NELBO (nats/dim)",
    "psnr": "recon PSNR (dB)", "ssim": "recon SSIM", "active_dims": "active latent dims", "fid_prior": "FID prior samples",
    "rfid": "rFID", "parameters": "parameters", "num_images": "images",
}


def print_vae_table(results: dict[str, dict], title: str = "VAE evaluation") -> None:
    """A rich table with one column per evaluated run (``results``: run label -> :func:`evaluate_vae` dict)."""
    rows = []
    for key, label in VAE_LABELS.items():
        row = []
        for res in results.values():
            value = res.get(key)
            if value is None:
                row.append(f"[dim]unavailable: {res.get('unavailable', {}).get(key, '')}")
            elif isinstance(value, float):
                row.append(f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}")
            else:
                row.append(f"{value:,}" if isinstance(value, int) else str(value))
        rows.append((label, *row))
    print_result_table(title, ["metric"], list(results), rows)


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "evaluate"
PIPELINE_RECORD = True


def inputs(cfg: Recipe) -> dict:
    return {"eval": settings(cfg.eval), "tokenizer": tokenizer_sha256(cfg),
            "samples": file_sha256(samples_dir(cfg) / "samples.npz")}


def is_complete(cfg: Recipe) -> bool:
    return (cfg.run_dir() / "eval.json").is_file() and recorded(cfg, NAME) == inputs(cfg)


def run(cfg: Recipe, rt: Runtime, *, make_ref: Path | None = None, **options) -> dict | Path | None:
    """:func:`run_evaluate` (``options``: gfid, samples, weights, out), or with ``make_ref`` only the reference
    batch (:func:`make_reference`, written by rank 0)."""
    if make_ref is not None:
        return make_reference(cfg, rt, make_ref) if rt.is_main else None
    return run_evaluate(cfg, rt, **options)
