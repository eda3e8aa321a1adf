"""``ssr probe-channels``: do the latent channels behave like ordered basis coefficients?

(a) unmasking grid (paper Fig. 6): decode with only the k lowest-frequency channels kept (frequency
    order of the basis grid, appendix A.6), the others set to ``probe.fill`` (:func:`mask_fill`), k = 1 … C;
(b) latent dynamics (paper Fig. 5): spatial mean of the first channels along a blur sequence beside the
    image's true basis coefficients along the same sequence;
(c) numbers: PSNR of the partial decodes against the input for every k, and two frequency-ordering
    scores: Spearman's rank correlation between a channel's position in the frequency order and (i) the
    radial frequency (power-spectrum centroid) of what adding that channel changes in the image, (ii) how
    fast the channel's spatial detail decays under blur (:func:`blur_decay`, the dynamics SSR trains), and the
    error of Ā's prediction under blur, with the dynamics the run learned when it has them
    (:func:`probe_dynamics`);
(d) figures of the paper's Fig. 4(a) (latent-norm maps, :func:`latent_norm_maps`), Fig. 8 (the blur ladder,
    :func:`blur_ladder`) and Fig. 9 (basis function beside channel map, :func:`channel_basis_maps`).
Works for any tokenizer, regularized or not, so runs can be compared side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssr_cli.bases import basis_functions, frequency_order, project
from ssr_cli.blur import gaussian_blur
from ssr_cli.dynamics import dynamics_from_config, load_dynamics, resolve_grid
from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.progress import console, print_result_table
from ssr_cli.engine.runtime import Runtime
from ssr_cli.errors import UserError, UserValueError
from ssr_cli.images import save_grid
from ssr_cli.inputs import file_sha256, settings
from ssr_cli.metrics.pixel import psnr_uint8
from ssr_cli.plots import plot_basis_channels, plot_curves, plot_latent_dynamics, plot_latent_norms
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    build_tokenizer,
    dynamics_error,
    image_dataset,
    learned_dynamics_path,
    load_tokenizer_for_run,
    recorded,
    tokenizer_sha256,
)


def radial_centroid(images: torch.Tensor) -> float:
    """Power-weighted mean radial frequency (cycles/pixel) of (N, 3, H, W) images (grey, mean removed)."""
    grey = images.float().mean(dim=1)
    grey = grey - grey.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(grey).abs().pow(2).mean(dim=0)
    h, w = power.shape
    fy = torch.fft.fftfreq(h).reshape(-1, 1)
    fx = torch.fft.fftfreq(w).reshape(1, -1)
    radius = (fx.pow(2) + fy.pow(2)).sqrt()
    total = power.sum()
    return float((power * radius).sum() / total) if total > 0 else 0.0


@torch.no_grad()
def blur_decay(tokenizer, images: torch.Tensor, tau: float) -> np.ndarray:
    """Per channel: ‖z_c(blur(x, τ)) − spatial mean‖ / ‖z_c(x) − spatial mean‖ over ``images``.

    The basis dynamics make a channel's spatial detail decay faster the higher its frequency (Fourier:
    exp(−Δτ·(w² + h²)·const)), so in a regularized latent this ratio falls along the frequency order."""
    def centred(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        return z - z.mean(dim=(-2, -1), keepdim=True)

    z0 = centred(tokenizer.encode_latent(images))
    zt = centred(tokenizer.encode_latent(gaussian_blur(images, torch.full((images.shape[0],), float(tau),
                                                                           device=images.device))))
    num = zt.pow(2).sum(dim=(0, 2, 3)).sqrt()
    den = z0.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-12)
    return (num / den).clamp_min(1e-12).cpu().numpy()


FILLS = ("dataset_mean", "image_mean", "zero")


def mask_fill(z: torch.Tensor, rule: str = "dataset_mean") -> torch.Tensor:
    """The value a masked channel takes, (B, C), for latents z (B, C, h, w): ``dataset_mean`` the channel's mean
    over all images and positions of z, ``image_mean`` each image's own spatial mean, ``zero`` 0."""
    b, c = z.shape[:2]
    if rule == "dataset_mean":
        return z.mean(dim=(0, 2, 3)).expand(b, c)
    if rule == "image_mean":
        return z.mean(dim=(2, 3))
    if rule == "zero":
        return z.new_zeros(b, c)
    raise UserValueError(f"probe.fill must be one of {', '.join(FILLS)}, got {rule!r}")


def latent_norm_maps(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Fig. 4(a): per-position norm over channels of z (B, C, h, w), ‖z[:, :, i, j]‖, and the same of the
    centred latent z − spatial mean (per image and channel). Both (B, h, w), float64."""
    z = z.double()
    return z.pow(2).sum(dim=1).sqrt(), (z - z.mean(dim=(-2, -1), keepdim=True)).pow(2).sum(dim=1).sqrt()


@torch.no_grad()
def blur_ladder(tokenizer, images: torch.Tensor, tau_max: float, levels: int = 6
                ) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """Paper Fig. 8: τ = 0 … τ_max in ``levels`` equal steps; per τ the blurred images (N, 3, H, W) and their
    decoded latents D(E(blur(x, τ))) (clamped to [-1, 1])."""
    taus = [float(t) for t in np.linspace(0.0, tau_max, levels)]
    blurred = [gaussian_blur(images, tau) for tau in taus]
    decoded = [tokenizer.decode(tokenizer.encode_latent(b)).float().clamp(-1, 1) for b in blurred]
    return taus, blurred, decoded


def channel_basis_maps(basis: str, grid_w: int, grid_h: int, height_px: int, width_px: int) -> np.ndarray:
    """Paper Fig. 9: the basis function channel n = w + W·h stands for, sampled at pixel centres,
    (C, height_px, width_px); the real part for Fourier (cos 2π(w·x + h·y) on the unit square)."""
    return np.real(basis_functions(basis, grid_w, grid_h, height_px, width_px))


def probe_dynamics(cfg: Recipe, grid_w: int, grid_h: int):
    """The Ā the probe scores, and a record of where it came from: the dynamics the run learned
    (``<run>/finetune/ssr_dynamics.safetensors``) when that file exists, else the recipe's initial A and Δ."""
    r = cfg.regularizer
    path = learned_dynamics_path(cfg)
    if path.is_file():
        dynamics, source = load_dynamics(path), "learned"
        if dynamics.channels != grid_w * grid_h:
            raise UserError(f"{path} holds a {dynamics.channels}-channel A but the tokenizer's latent has "
                            f"{grid_w * grid_h} channels; probe this run's own tokenizer, or delete the file")
    else:
        dynamics = dynamics_from_config(r, grid_w * grid_h, image_size=cfg.data.image_size, seed=cfg.run.seed)
        source = "recipe"
    record = {"source": source, "path": str(path) if source == "learned" else None,
              "delta": float(dynamics.delta.detach()), "discretization": dynamics.discretization}
    return dynamics, record


@torch.no_grad()
def partial_decodes(tokenizer, z: torch.Tensor, order: list[int], fill: torch.Tensor) -> list[torch.Tensor]:
    """Decodes keeping the first k channels of ``order`` (k = 1 … C), the rest set to ``fill``: (C,) for every
    image alike or (B, C) per image (:func:`mask_fill`)."""
    out = []
    masked = fill.reshape(-1, z.shape[1], 1, 1).expand_as(z).clone()
    for ch in order:
        masked[:, ch] = z[:, ch]
        out.append(tokenizer.decode(masked).float().clamp(-1, 1))
    return out


def probe_grid(cfg: Recipe, channels: int) -> tuple[int, int]:
    """The [regularizer]'s basis grid (W, H) over a latent of ``channels`` channels; a grid that does not fit is
    a ValueError naming ``regularizer.grid`` (raised by the run and by ``--dry-run`` alike)."""
    return resolve_grid(channels, cfg.regularizer.grid)


@torch.no_grad()
def run_probe(cfg: Recipe, rt: Runtime, *, weights: str | None = None, out_dir: Path | None = None) -> dict:
    from scipy.stats import spearmanr

    out = Path(out_dir) if out_dir else cfg.run_dir() / "probe"
    out.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        tokenizer, source = build_tokenizer(cfg, weights=weights), weights
    else:
        tokenizer, source = load_tokenizer_for_run(cfg)
    tokenizer = tokenizer.to(rt.device).eval()
    size = cfg.probe.image_size or cfg.data.image_size
    ds = image_dataset(cfg, augment=False, image_size=size)
    # One pool of images spread over the data set: the channel means for masking, the numbers (PSNR vs k,
    # both order scores) and, its first num_images, the figure rows.
    n_pool = min(len(ds), max(cfg.probe.score_images, cfg.probe.num_images))
    stride = max(1, len(ds) // n_pool)
    pool = torch.stack([ds[(i * stride, None)][0] for i in range(n_pool)]).to(rt.device)
    images = pool[: cfg.probe.num_images]

    z_pool = tokenizer.encode_latent(pool)
    channels = z_pool.shape[1]
    grid_w, grid_h = probe_grid(cfg, channels)
    order = frequency_order(grid_w, grid_h)
    fill = mask_fill(z_pool, cfg.probe.fill)

    # (a) + (c): partial decodes of the whole pool; the figure shows its first rows.
    partial = partial_decodes(tokenizer, z_pool, order, fill)
    n_show = images.shape[0]
    columns = [images.cpu()] + [p[:n_show].cpu() for p in partial]
    rows = [torch.stack([col[i] for col in columns]) for i in range(n_show)]
    grid_path = save_grid(rows, out / "unmasking.png", col_labels=["input"] + [f"k={k}" for k in range(1, channels + 1)])
    psnr_k = [float(psnr_uint8(p, pool).mean()) for p in partial]
    previous = [tokenizer.decode(fill[:, :, None, None].expand_as(z_pool)).float().clamp(-1, 1)] + partial[:-1]
    centroids = [radial_centroid(cur - prev) for cur, prev in zip(partial, previous)]
    rho = float(spearmanr(np.arange(channels), centroids).statistic) if channels > 2 else float("nan")
    decay = blur_decay(tokenizer, pool, max(cfg.probe.taus))
    r = cfg.regularizer
    pairs = [(float(t1), float(t1 + r.delta_tau)) for t1 in np.linspace(0.0, r.tau_max - r.delta_tau, 4)]
    dynamics, dynamics_record = probe_dynamics(cfg, grid_w, grid_h)
    dyn_err = dynamics_error(tokenizer, pool, dynamics, pairs, mean_centering=r.mean_centering)
    rho_decay = (float(spearmanr(np.arange(channels), -np.log(decay[order])).statistic)
                 if channels > 2 else float("nan"))
    curve_path = plot_curves(np.arange(1, channels + 1), {"partial decode": np.asarray(psnr_k)},
                             out / "psnr_vs_k.png", xlabel="channels kept (frequency order)", ylabel="PSNR (dB)",
                             title=f"{cfg.tokenizer.family}/{cfg.tokenizer.size}")

    # (b): latent dynamics along a blur sequence, beside the true coefficients of the same image.
    taus = list(cfg.probe.taus)
    shown = order[: min(cfg.probe.channels_shown, channels)]
    first = images[:1]
    latent_means, true_coeffs = [], []
    grey = first[0].float().mean(dim=0)
    for tau in taus:
        blurred = gaussian_blur(first, torch.tensor([tau], device=first.device))
        zt = tokenizer.encode_latent(blurred)
        latent_means.append(zt[0, shown].mean(dim=(-2, -1)).float().cpu().numpy())
        g = gaussian_blur(grey[None, None], torch.tensor([tau], device=first.device))[0, 0].cpu().numpy()
        # a random A has no basis functions: its plot shows the image's Fourier coefficients
        coeff = project(g, "fourier" if r.basis == "random" else r.basis, grid_w, grid_h)
        true_coeffs.append(np.real(coeff)[shown])
    labels = [f"ch {c} (w,h)=({c % grid_w},{c // grid_w})" for c in shown]
    dyn_path = plot_latent_dynamics(taus, np.stack(latent_means), np.stack(true_coeffs), labels,
                                    out / "latent_dynamics.png",
                                    title=f"{cfg.regularizer.basis} {grid_w}x{grid_h} grid")
    # Fig. 4(a): latent-norm maps of the sharp and the τ_max-blurred images, raw and centred.
    blurred = gaussian_blur(images, r.tau_max)
    norms = {"sharp": latent_norm_maps(tokenizer.encode_latent(images)),
             "blurred": latent_norm_maps(tokenizer.encode_latent(blurred))}
    norm_data = {"sharp_images": images.float().cpu().numpy(), "blurred_images": blurred.float().cpu().numpy(),
                 **{f"{k}_{part}": m.cpu().numpy() for k, maps in norms.items() for part, m in zip(("raw", "centred"), maps)}}
    norm_path = plot_latent_norms(norm_data["sharp_images"], norm_data["blurred_images"],
                                  {k: (norm_data[f"{k}_raw"], norm_data[f"{k}_centred"]) for k in norms},
                                  out / "latent_norms.png", tau=r.tau_max)
    np.savez(out / "latent_norms.npz", tau=np.float64(r.tau_max), **norm_data)  # for --compare
    # Fig. 8: the blur ladder at the training resolution (the images the SSR pairs are drawn from).
    train_ds = ds if size == cfg.data.image_size else image_dataset(cfg, augment=False, image_size=cfg.data.image_size)
    ladder_images = torch.stack([train_ds[(i * stride, None)][0] for i in range(images.shape[0])]).to(rt.device)
    ladder_taus, ladder_blurred, ladder_decoded = blur_ladder(tokenizer, ladder_images, r.tau_max)
    ladder_rows, ladder_labels = [], []
    for i in range(ladder_images.shape[0]):
        ladder_rows += [torch.stack([b[i] for b in ladder_blurred]).cpu(), torch.stack([d[i] for d in ladder_decoded]).cpu()]
        ladder_labels += [f"image {i}", f"D(E) {i}"]
    ladder_path = save_grid(ladder_rows, out / "blur_ladder.png", row_labels=ladder_labels,
                            col_labels=[f"t={t:g}" for t in ladder_taus])
    # Fig. 9: the basis function each channel stands for, beside that channel's (centred) map of the first image.
    z_first = tokenizer.encode_latent(images[:1])[0].double()
    channel_maps = (z_first - z_first.mean(dim=(-2, -1), keepdim=True)).cpu().numpy()
    shown = "fourier" if r.basis == "random" else r.basis  # a random A has no basis functions: Fourier's are drawn
    basis_path = plot_basis_channels(channel_basis_maps(shown, grid_w, grid_h, *images.shape[-2:]), channel_maps,
                                     grid_w, grid_h, out / "basis_channels.png", basis=shown)
    result = {
        "tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}",
        "weights": str(source) if source else None,
        "grid": f"{grid_w}x{grid_h}",
        "frequency_order": order,
        "fill": cfg.probe.fill,
        "psnr_vs_k": psnr_k,
        "psnr_full": psnr_k[-1],
        "psnr_half": psnr_k[channels // 2 - 1] if channels > 1 else psnr_k[0],
        "frequency_centroids": centroids,
        "frequency_order_spearman": rho,
        "blur_decay": decay.tolist(),
        "blur_decay_spearman": rho_decay,
        "dynamics_error": dyn_err["relative"],
        "dynamics_error_no_change": dyn_err["no_change"],
        "dynamics_tau_pairs": [list(pair) for pair in pairs],
        "dynamics": dynamics_record,
        "latent_norm_mean": {k: {"raw": float(raw.mean()), "centred": float(centred.mean())}
                             for k, (raw, centred) in norms.items()},
        "blur_ladder_taus": ladder_taus,
        "latent_norms_data": str(out / "latent_norms.npz"),
        "figures": {"unmasking": str(grid_path), "psnr_vs_k": str(curve_path), "latent_dynamics": str(dyn_path),
                    "latent_norms": str(norm_path), "blur_ladder": str(ladder_path),
                    "basis_channels": str(basis_path)},
    }
    if rt.is_main:
        write_json_atomic(out / "probe.json", result, indent=2)
        console.print(f"probe-channels: PSNR k=1 {psnr_k[0]:.2f} dB → k={channels} {psnr_k[-1]:.2f} dB; "
                      f"frequency-order Spearman ρ = {rho:.3f}; blur-decay order ρ = {rho_decay:.3f}; "
                      f"Ā prediction error {dyn_err['relative']:.3f} (no-change {dyn_err['no_change']:.3f}) with the "
                      f"{'learned' if dynamics_record['source'] == 'learned' else 'recipe'} Ā "
                      f"(Δ = {dynamics_record['delta']:.4g}); masked channels = {cfg.probe.fill}; figures in {out}")
    return result


COMPARED = (("psnr_full", "PSNR, all channels (dB)"), ("psnr_half", "PSNR, half the channels (dB)"),
            ("blur_decay_spearman", "blur-decay order ρ"), ("frequency_order_spearman", "centroid order ρ"),
            ("dynamics_error", "Ā prediction error"), ("dynamics_error_no_change", "no-change error"))


def compare_latent_norms(results: dict[str, dict], path: Path) -> Path | None:
    """Fig. 4(a) across runs: one row per probe (its first image), every map on one colour scale, so a tokenizer
    trained without centring shows its larger latent norms. None when a probe has no latent-norm data."""
    files = [r.get("latent_norms_data") for r in results.values()]
    if not all(f and Path(f).is_file() for f in files):
        return None
    data = [np.load(f) for f in files]
    first = {key: [d[key][0] for d in data] for key in data[0].files if key != "tau"}
    return plot_latent_norms(first["sharp_images"], first["blurred_images"],
                             {k: (first[f"{k}_raw"], first[f"{k}_centred"]) for k in ("sharp", "blurred")}, path,
                             tau=float(data[0]["tau"]), row_labels=list(results), shared_scale=True)


def compare_probes(results: dict[str, dict], out_dir: Path) -> Path:
    """Several probes (label -> :func:`run_probe` result) side by side: one PSNR-vs-k figure, the latent-norm
    maps of :func:`compare_latent_norms` and a table."""
    lengths = {len(r["psnr_vs_k"]) for r in results.values()}
    if len(lengths) != 1:
        raise UserValueError(f"cannot compare tokenizers with different channel counts ({sorted(lengths)})")
    k = np.arange(1, lengths.pop() + 1)
    path = plot_curves(k, {label: np.asarray(r["psnr_vs_k"]) for label, r in results.items()},
                       Path(out_dir) / "compare_psnr_vs_k.png", xlabel="channels kept (frequency order)",
                       ylabel="PSNR (dB)", title="partial decodes")
    rows = [(name, *(f"{r[key]:.4g}" for r in results.values())) for key, name in COMPARED]
    # the Ā error of each column is that of its own run's Ā: learned for an SSR run, the recipe's otherwise
    rows.append(("Ā scored", *(r.get("dynamics", {}).get("source", "recipe") for r in results.values())))
    print_result_table("ssr probe-channels: comparison", ["score"], list(results), rows)
    norms = compare_latent_norms(results, Path(out_dir) / "compare_latent_norms.png")
    console.print(f"comparison figures: {path}" + (f", {norms}" if norms else ""))
    return path


# -- the stage protocol (ssr_cli.stages.pipeline) ----------------------------------------------------------
NAME = "probe-channels"
PIPELINE_RECORD = True


def inputs(cfg: Recipe) -> dict:
    """The probe scores the Ā the run learned when it has one (:func:`probe_dynamics`)."""
    return {"probe": settings(cfg.probe), "regularizer": settings(cfg.regularizer), "tokenizer": tokenizer_sha256(cfg),
            "dynamics": file_sha256(learned_dynamics_path(cfg))}


def is_complete(cfg: Recipe) -> bool:
    return (cfg.run_dir() / "probe" / "probe.json").is_file() and recorded(cfg, NAME) == inputs(cfg)


def run(cfg: Recipe, rt: Runtime, **options) -> dict:
    """:func:`run_probe` (``options``: weights, out_dir)."""
    return run_probe(cfg, rt, **options)
