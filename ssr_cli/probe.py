"""``ssr probe-channels``: do the latent channels behave like ordered basis coefficients?

(a) unmasking grid (paper Fig. 6): decode with only the k lowest-frequency channels kept (frequency
    order of the basis grid, appendix A.6), the others set to their data-set mean, k = 1 … C;
(b) latent dynamics (paper Fig. 5): spatial mean of the first channels along a blur sequence beside the
    image's true basis coefficients along the same sequence;
(c) numbers: PSNR of the partial decodes against the input for every k, and two frequency-ordering
    scores: Spearman's rank correlation between a channel's position in the frequency order and (i) the
    radial frequency (power-spectrum centroid) of what adding that channel changes in the image, (ii) how
    fast the channel's spatial detail decays under blur (:func:`blur_decay`, the dynamics SSR trains).
Works for any tokenizer, regularized or not, so runs can be compared side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ssr_cli.engine.progress import console
from ssr_cli.engine.runtime import Runtime
from ssr_cli.recipe import Recipe


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
    from ssr_cli.blur import gaussian_blur

    def centred(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        return z - z.mean(dim=(-2, -1), keepdim=True)

    z0 = centred(tokenizer.encode_latent(images))
    zt = centred(tokenizer.encode_latent(gaussian_blur(images, torch.full((images.shape[0],), float(tau),
                                                                           device=images.device))))
    num = zt.pow(2).sum(dim=(0, 2, 3)).sqrt()
    den = z0.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-12)
    return (num / den).clamp_min(1e-12).cpu().numpy()


@torch.no_grad()
def dynamics_error(tokenizer, images: torch.Tensor, dynamics, tau_pairs: list[tuple[float, float]], *,
                   mean_centering: bool = True) -> dict[str, float]:
    """How well Ā predicts the latent of a blurrier image from a sharper one (what SSR trains), over ``images``.

    For each (τ1, τ2): z1 = E(blur(x, τ1)), z2 = E(blur(x, τ2)) (posterior means), ẑ2 = dynamics.predict(z1).
    Returns ``relative`` = Σ‖ẑ2 − z2‖² / Σ‖z2 − spatial mean‖² and ``no_change`` = the same with ẑ2 = z1
    (the error of assuming the latent does not move), both summed over images, channels and pairs."""
    from ssr_cli.blur import gaussian_blur

    err = base = still = 0.0
    n = images.shape[0]
    for tau1, tau2 in tau_pairs:
        z1 = tokenizer.encode_latent(gaussian_blur(images, torch.full((n,), float(tau1), device=images.device))).float()
        z2 = tokenizer.encode_latent(gaussian_blur(images, torch.full((n,), float(tau2), device=images.device))).float()
        pred = dynamics.to(z1.device).predict(z1, mean_centering=mean_centering)
        err += float((pred - z2).double().pow(2).sum())
        still += float((z1 - z2).double().pow(2).sum())
        base += float((z2 - z2.mean(dim=(-2, -1), keepdim=True)).double().pow(2).sum())
    base = max(base, 1e-30)
    return {"relative": err / base, "no_change": still / base}


@torch.no_grad()
def partial_decodes(tokenizer, z: torch.Tensor, order: list[int], fill: torch.Tensor) -> list[torch.Tensor]:
    """Decodes keeping the first k channels of ``order`` (k = 1 … C), the rest set to ``fill`` (C,)."""
    out = []
    masked = fill.reshape(1, -1, 1, 1).expand_as(z).clone()
    for ch in order:
        masked[:, ch] = z[:, ch]
        out.append(tokenizer.decode(masked).float().clamp(-1, 1))
    return out


@torch.no_grad()
def run_probe(cfg: Recipe, rt: Runtime, *, weights: str | None = None, out_dir: Path | None = None) -> dict:
    from scipy.stats import spearmanr

    from ssr_cli.bases import frequency_order, grid_for_channels, project
    from ssr_cli.blur import gaussian_blur
    from ssr_cli.finetune import build_tokenizer, load_tokenizer_for_run
    from ssr_cli.images import save_grid
    from ssr_cli.metrics import psnr_uint8
    from ssr_cli.plots import plot_curves, plot_latent_dynamics
    from ssr_cli.regularizers import dynamics_from_config
    from ssr_cli.training import image_dataset

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
    grid_w, grid_h = grid_for_channels(channels, cfg.regularizer.grid)
    order = frequency_order(grid_w, grid_h)
    fill = z_pool.mean(dim=(0, 2, 3))

    # (a) + (c): partial decodes of the whole pool; the figure shows its first rows.
    partial = partial_decodes(tokenizer, z_pool, order, fill)
    n_show = images.shape[0]
    columns = [images.cpu()] + [p[:n_show].cpu() for p in partial]
    rows = [torch.stack([col[i] for col in columns]) for i in range(n_show)]
    grid_path = save_grid(rows, out / "unmasking.png", col_labels=["input"] + [f"k={k}" for k in range(1, channels + 1)])
    psnr_k = [float(psnr_uint8(p, pool).mean()) for p in partial]
    previous = [tokenizer.decode(fill.reshape(1, -1, 1, 1).expand_as(z_pool)).float().clamp(-1, 1)] + partial[:-1]
    centroids = [radial_centroid(cur - prev) for cur, prev in zip(partial, previous)]
    rho = float(spearmanr(np.arange(channels), centroids).statistic) if channels > 2 else float("nan")
    decay = blur_decay(tokenizer, pool, max(cfg.probe.taus))
    r = cfg.regularizer
    pairs = [(float(t1), float(t1 + r.delta_tau)) for t1 in np.linspace(0.0, r.tau_max - r.delta_tau, 4)]
    recipe_dynamics = dynamics_from_config(r, channels, image_size=cfg.data.image_size, seed=cfg.run.seed)
    dyn_err = dynamics_error(tokenizer, pool, recipe_dynamics, pairs, mean_centering=r.mean_centering)
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
    result = {
        "tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}",
        "weights": str(source) if source else None,
        "grid": f"{grid_w}x{grid_h}",
        "frequency_order": order,
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
        "figures": {"unmasking": str(grid_path), "psnr_vs_k": str(curve_path), "latent_dynamics": str(dyn_path)},
    }
    if rt.is_main:
        (out / "probe.json").write_text(json.dumps(result, indent=2))
        console.print(f"probe-channels: PSNR k=1 {psnr_k[0]:.2f} dB → k={channels} {psnr_k[-1]:.2f} dB; "
                      f"frequency-order Spearman ρ = {rho:.3f}; blur-decay order ρ = {rho_decay:.3f}; "
                      f"Ā prediction error {dyn_err['relative']:.3f} (no-change {dyn_err['no_change']:.3f}); figures in {out}")
    return result


COMPARED = (("psnr_full", "PSNR, all channels (dB)"), ("psnr_half", "PSNR, half the channels (dB)"),
            ("blur_decay_spearman", "blur-decay order ρ"), ("frequency_order_spearman", "centroid order ρ"),
            ("dynamics_error", "Ā prediction error"), ("dynamics_error_no_change", "no-change error"))


def compare_probes(results: dict[str, dict], out_dir: Path) -> Path:
    """Several probes (label -> :func:`run_probe` result) side by side: one PSNR-vs-k figure and a table."""
    from rich.table import Table

    from ssr_cli.plots import plot_curves

    lengths = {len(r["psnr_vs_k"]) for r in results.values()}
    if len(lengths) != 1:
        raise ValueError(f"cannot compare tokenizers with different channel counts ({sorted(lengths)})")
    k = np.arange(1, lengths.pop() + 1)
    path = plot_curves(k, {label: np.asarray(r["psnr_vs_k"]) for label, r in results.items()},
                       Path(out_dir) / "compare_psnr_vs_k.png", xlabel="channels kept (frequency order)",
                       ylabel="PSNR (dB)", title="partial decodes")
    table = Table(title="ssr probe-channels: comparison")
    table.add_column("score")
    for label in results:
        table.add_column(label, justify="right")
    for key, name in COMPARED:
        table.add_row(name, *(f"{r[key]:.4g}" for r in results.values()))
    console.print(table)
    console.print(f"comparison figure: {path}")
    return path
