"""Figures of the toolkit, one function per figure; each writes a PNG and returns its path.

Matplotlib runs headless (Agg); functions never call ``plt.show``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter  # noqa: E402
import numpy as np  # noqa: E402

from ssr_cli.engine.atomic import atomic_write  # noqa: E402


def _save(fig, path: str | Path, dpi: int, *, tight: bool = True) -> Path:
    """Write atomically (temp file + rename) so a crashed run never leaves a truncated PNG. ``tight`` crops the
    canvas to what is drawn (a second layout pass; figures with a fixed layout skip it)."""
    kwargs = {"bbox_inches": "tight"} if tight else {}
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", **kwargs))
    finally:
        plt.close(fig)


def plot_a_matrix(A: np.ndarray, basis: str, W: int, H: int, path: str | Path, *, log_scale: bool | None = None,
                  title: str | None = None, dpi: int = 150) -> Path:
    """Heatmap of a (C, C) A matrix, C = W·H, in the style of the paper's Fig. 7.

    Rows k and columns n are channels, ticks labelled (w, h) with n = w + W·h. Structural zeros are blank
    (white). ``log_scale`` (default: on for Hermite, whose entries span many orders of magnitude) shows
    log10|A|; otherwise a diverging colormap symmetric about 0. Returns ``path``."""
    A = np.asarray(A, dtype=np.float64)
    C = W * H
    if A.shape != (C, C):
        raise ValueError(f"A has shape {A.shape}, expected ({C}, {C}) for a {W}x{H} grid")
    if log_scale is None:
        log_scale = basis == "hermite"
    zero = A == 0
    size_in = min(14.0, max(4.5, 0.22 * C + 2.5))
    fig, ax = plt.subplots(figsize=(size_in + 1.2, size_in))
    if log_scale:
        shown = np.ma.masked_where(zero, np.log10(np.where(zero, 1.0, np.abs(A))))
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        label = "log10 |A|"
        kwargs = {}
    else:
        shown = np.ma.masked_where(zero, A)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
        peak = float(np.max(np.abs(A))) or 1.0
        label = "A"
        kwargs = {"vmin": -peak, "vmax": peak}
    im = ax.imshow(shown, cmap=cmap, interpolation="nearest", **kwargs)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    step = 1 if C <= 64 else int(np.ceil(C / 64))
    ticks = np.arange(0, C, step)
    labels = [f"({n % W},{n // W})" for n in ticks]
    fontsize = 8 if C <= 16 else (6 if C <= 36 else 4.5)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("column n: basis function φ_(w,h) differentiated")
    ax.set_ylabel("row k: projected onto φ_(w,h)")
    # thin grid lines between channels make the sparsity pattern readable
    ax.set_xticks(np.arange(-0.5, C, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, C, 1), minor=True)
    ax.grid(which="minor", color="0.9", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title or f"{basis.capitalize()} A, {W}x{H} grid")
    return _save(fig, path, dpi)


def plot_latent_dynamics(taus, latent: np.ndarray, true: np.ndarray, labels: list[str], path: str | Path, *,
                         title: str = "", dpi: int = 120) -> Path:
    """Paper Fig. 5 style: per-channel spatial mean of the latent along a blur sequence (left) beside the
    image's true basis coefficients (right), each curve divided by its largest magnitude over τ (a ratio to
    the first value would explode for a coefficient that starts near zero).

    latent, true: (T, K) for T blur levels and K channels/coefficients; labels: K legend entries."""
    taus = np.asarray(taus, dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, values, name in ((axes[0], latent, "latent channel mean"), (axes[1], true, "true basis coefficient")):
        values = np.asarray(values, dtype=np.float64)
        scale = np.abs(values).max(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        for k in range(values.shape[1]):
            ax.plot(taus, values[:, k] / scale[k], marker="o", ms=3, label=labels[k])
        ax.set_xlabel("blur variance τ (px²)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("value / max |value| over τ")
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


def plot_curves(x, curves: dict[str, np.ndarray], path: str | Path, *, xlabel: str, ylabel: str, title: str = "",
                dpi: int = 120) -> Path:
    """Simple line plot of named curves over a shared x (e.g. PSNR of partial decodes vs k)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, y in curves.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def _rgb(image: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1] for imshow."""
    return np.clip((np.transpose(image, (1, 2, 0)) + 1.0) / 2.0, 0.0, 1.0)


def plot_latent_norms(sharp: np.ndarray, blurred: np.ndarray, maps: dict[str, tuple[np.ndarray, np.ndarray]],
                      path: str | Path, *, tau: float, row_labels: list[str] | None = None,
                      shared_scale: bool = False, dpi: int = 110) -> Path:
    """Paper Fig. 4(a): per row the input, ‖z‖ and ‖C(z)‖ maps for the sharp image, then the same for the image
    blurred with variance ``tau``. sharp, blurred: (N, 3, H, W) in [-1, 1]; maps["sharp"|"blurred"] = (raw,
    centred) per-position norms (N, h, w). Raw maps share one colour scale per row, centred maps another, so
    sharp and blurred compare directly; ``shared_scale``: one scale over all rows (rows = runs, to compare
    latent norms across tokenizers, e.g. trained with and without centring; then the arguments may be lists of
    per-row arrays of different sizes)."""
    n = len(sharp)
    fig, axes = plt.subplots(n, 6, figsize=(12, 2.1 * n), squeeze=False)
    titles = ["sharp input", "‖z‖ sharp", "‖C(z)‖ sharp", f"blurred τ={tau:g}", "‖z‖ blurred", "‖C(z)‖ blurred"]
    for i in range(n):
        rows = range(n) if shared_scale else [i]
        raw_max = max([float(np.max(maps[k][0][j])) for k in maps for j in rows] + [1e-12])
        cen_max = max([float(np.max(maps[k][1][j])) for k in maps for j in rows] + [1e-12])
        for j, (key, image) in enumerate((("sharp", sharp), ("blurred", blurred))):
            axes[i, 3 * j].imshow(_rgb(image[i]))
            im_raw = axes[i, 3 * j + 1].imshow(maps[key][0][i], cmap="magma", vmin=0, vmax=raw_max)
            im_cen = axes[i, 3 * j + 2].imshow(maps[key][1][i], cmap="magma", vmin=0, vmax=cen_max)
        fig.colorbar(im_raw, ax=axes[i, 4], fraction=0.046, pad=0.04)
        fig.colorbar(im_cen, ax=axes[i, 5], fraction=0.046, pad=0.04)
        if row_labels:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path, dpi)


def _tile_mosaic(maps: np.ndarray, W: int, H: int, gap: int = 1) -> np.ndarray:
    """(W·H, h, w) maps -> one (H·(h+gap), W·(w+gap)) array, map n = w + W·h at block (h, w), each divided by its
    largest magnitude (so in [-1, 1]); NaN between the blocks."""
    _, h, w = maps.shape
    out = np.full((H * (h + gap) - gap, W * (w + gap) - gap), np.nan)
    for n in range(W * H):
        peak = float(np.abs(maps[n]).max()) or 1.0
        r, c = (n // W) * (h + gap), (n % W) * (w + gap)
        out[r:r + h, c:c + w] = maps[n] / peak
    return out


def plot_basis_channels(basis_maps: np.ndarray, channel_maps: np.ndarray, W: int, H: int, path: str | Path, *,
                        basis: str, dpi: int = 110) -> Path:
    """Paper Fig. 9: the W×H grid of basis functions (left; block (h, w) is φ_(w,h), channel n = w + W·h) beside
    the same grid of latent channel maps (right). basis_maps: (C, Hpx, Wpx); channel_maps: (C, h, w); each block
    on its own symmetric colour scale."""
    C = W * H
    if basis_maps.shape[0] != C or channel_maps.shape[0] != C:
        raise ValueError(f"need {C} basis and channel maps for a {W}x{H} grid, got {basis_maps.shape[0]} and "
                         f"{channel_maps.shape[0]}")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.1 * W + 0.6), 1.1 * H + 0.9))
    for ax, maps, title in ((axes[0], basis_maps, f"{basis} basis functions φ_(w,h)"),
                            (axes[1], channel_maps, f"latent channel n = w + {W}·h (centred)")):
        mosaic = _tile_mosaic(np.asarray(maps, dtype=np.float64), W, H)
        ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        bh, bw = (mosaic.shape[0] + 1) / H, (mosaic.shape[1] + 1) / W
        ax.set_xticks((np.arange(W) + 0.5) * bw - 1, [f"w={w}" for w in range(W)], fontsize=7)
        ax.set_yticks((np.arange(H) + 0.5) * bh - 1, [f"h={h}" for h in range(H)], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


SKIPPED_CURVES = ("step", "steps_per_s", "img_per_s")


def plot_training_curves(records: list[dict], path: str | Path, *, title: str = "", dpi: int = 110) -> Path:
    """One small panel per logged scalar of ``metrics.jsonl`` records against the step (losses on a log
    axis when positive), so a run's health is one look: loss, its terms, grad norm, LR, Δ, ‖Ā‖, …"""
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in SKIPPED_CURVES})
    if not keys:
        raise ValueError("no scalar metrics to plot")
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    width, height = 3.2 * cols, 2.4 * rows + (0.4 if title else 0.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        steps, values = (np.asarray(v, dtype=np.float64) for v in zip(*pts)) if pts else (np.zeros(0), np.zeros(0))
        ax.plot(steps, values, lw=1.2)
        if values.size and np.all(values > 0) and values.max() / max(values.min(), 1e-300) > 20:
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(NullLocator())
        # a few labelled ticks per axis: each tick is a line and a text laid out at every draw (most of the cost)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        if ax.get_yscale() == "linear":
            ax.yaxis.set_major_locator(MaxNLocator(4))
            plain = ScalarFormatter(useOffset=False)  # full numbers on the ticks: nothing drawn above the panel
            plain.set_scientific(False)
            ax.yaxis.set_major_formatter(plain)
        # y given: the title stays where it is put, instead of being placed again past the tick labels' bounding
        # boxes at every draw; no offset text (a "1e-5" above a linear axis) for the title to clear
        ax.set_title(key, fontsize=9, y=1.0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    # A fixed layout in inches (room for 7-pt tick labels, a 9-pt title per panel, the suptitle) instead of
    # tight_layout + a tight bounding box: those lay every text out twice more, most of this figure's cost (about
    # 1 s of CPU for a fine-tune's 17 panels; it is drawn at the end of every training stage).
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.35 / height,
                        top=1 - (0.75 if title else 0.3) / height, wspace=0.75 * cols / width * 1.2,
                        hspace=0.55 * rows / height * 1.3)
    return _save(fig, path, dpi, tight=False)
