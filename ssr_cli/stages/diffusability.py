"""``ssr diffusability``: cheap signals of how well a diffusion model will model a tokenizer's latents.

Every proxy works on *normalised* latents x = (z − mean) / std (per channel, over the probe's training
latents), the space the DiT sees, so spaces of different scale compare:

- ``stats``: per-channel mean/std of the raw latents, excess kurtosis, effective rank of the channel
  covariance (exp of the entropy of its normalised eigenvalues) and PCA components for 99 % of the energy of
  the flattened latents; KL to N(0, I) per image for KL tokenizers.
- ``spectrum``: radially averaged power spectrum (FFT or orthonormal DCT-II) of normalised latents and of the
  normalised images, and the fraction of energy above half the Nyquist frequency.
- ``equivariance``: relative error ‖E(T x) − T E(x)‖ / ‖T E(x)‖ for 2×2 / 4×4 average-pool downsampling,
  rot90 and horizontal flip; for blur, the Ā-prediction error of ``probe-channels``
  (:func:`ssr_cli.stages.common.dynamics_error`, the same implementation).
- ``ifid``: interpolated FID (arXiv 2603.05630): each latent's nearest neighbour, the decoded interpolation,
  FID against the same data images. Choices made here: nearest neighbour by Euclidean distance between
  flattened normalised latents of the ``num_images`` pool (itself excluded), linear interpolation with weight
  ``ifid_weight`` (0.5 by default; 0 gives the rFID of the same images), reference = the pool's images.
- ``viv``: *nearest-neighbour posterior estimate* of the irreducible velocity variance. For x_t = t·x1 +
  (1 − t)·ε the best velocity is E[v | x_t] and its unavoidable error is Var(v | x_t) = Var(x1 | x_t)/(1 − t)²;
  the posterior over x1 is approximated by the empirical set of training latents, weights
  ∝ exp(−‖x_t − t·r_j‖² / (2(1 − t)²)), queried with held-out latents. Reported per dimension at each t of
  ``t_grid`` (the floor of the probe's per-t loss) and averaged. It sees only Euclidean geometry: a spatial
  permutation or an orthogonal channel mixing leaves it unchanged (a DiT's inductive bias does not).
- ``flow_probe``: a small LightningDiT trained for a fixed budget by the engine (seeded, resumable from its
  checkpoints), its held-out rectified-flow MSE on the fixed ``t_grid`` (per t and mean), and, with Inception
  weights, the FID of ``probe_samples`` samples against the pool's images.

Each proxy's result is cached in ``<out>/parts/<proxy>.json`` with the settings it depends on, so an
interrupted run continues with the proxies not yet done (the probe itself resumes mid-training).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.bases import grid_for_channels
from ssr_cli.data import batch_source
from ssr_cli.dynamics import dynamics_from_config
from ssr_cli.engine.atomic import atomic_write, write_json_atomic, write_text_atomic
from ssr_cli.engine.loop import TrainSpec, train
from ssr_cli.engine.optim import ParamGroup
from ssr_cli.engine.progress import console, make_progress, print_result_table
from ssr_cli.engine.runtime import Runtime, generator_for, step_seed
from ssr_cli.errors import UserError, UserValueError
from ssr_cli.inputs import file_sha256
from ssr_cli.metrics import PoolFeatureCache, frechet_distance_of_rows, to_uint8
from ssr_cli.models.flow import flow_loss, initial_noise, sample_ode
from ssr_cli.models.tokenizer import DiagonalGaussian
from ssr_cli.models.weights import read_safetensors
from ssr_cli.recipe import Recipe
from ssr_cli.stages.common import (
    DiTTask,
    build_dit_from,
    build_tokenizer,
    dynamics_error,
    fixed_images,
    fixed_seed,
    image_dataset,
    load_inception,
    load_tokenizer_for_run,
)

PROXIES = ("stats", "spectrum", "equivariance", "ifid", "viv", "flow_probe")
# (result key, label, lower is better) for the ranking table.
RANKED = (("flow_loss_mean", "flow probe loss (held-out)", True), ("flow_fid", "flow probe FID", True),
          ("ifid", "iFID", True), ("viv_mean", "velocity variance (NN posterior)", True),
          ("latent_hf_fraction", "latent energy > ½ Nyquist", True),
          ("equivariance_mean", "equivariance error (mean)", True), ("blur_dynamics_error", "Ā blur error", True),
          ("effective_rank", "effective rank (channels)", False))


# ------------------------------------------------------------------------------------------ latent spaces

class TransformedTokenizer(nn.Module):
    """A tokenizer whose latent is ``T(E(x))`` and decoder ``D(T⁻¹(z))``: the controlled degradations.

    ``noise``: T(z) = z + s·σ_c·ε (σ_c each channel's std over the batch; not inverted), ``permute``: a fixed
    permutation of the h·w positions (one per latent size, from the seed), ``mix``: z ↦ Q z over channels with a
    random orthogonal Q. ``none`` is the identity."""

    def __init__(self, base: nn.Module, kind: str = "none", strength: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.base, self.kind, self.strength, self.seed = base, kind, float(strength), int(seed)
        self.latent_channels = base.latent_channels
        self.downsample_factor = base.downsample_factor
        self.is_kl = False
        self._noise = torch.Generator().manual_seed(step_seed(seed, "latent-noise"))
        if kind == "mix":
            g = generator_for(seed, "latent-mix")
            q, r = torch.linalg.qr(torch.randn(self.latent_channels, self.latent_channels, generator=g,
                                               dtype=torch.float64))
            self.register_buffer("mix", (q * torch.sign(torch.diagonal(r))).float(), persistent=False)

    def _perm(self, h: int, w: int) -> torch.Tensor:
        return torch.randperm(h * w, generator=generator_for(self.seed, "latent-permute", h, w))

    def forward_map(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "noise":
            sigma = z.float().std(dim=(0, 2, 3), keepdim=True) if z.numel() > z.shape[1] else torch.ones(1)
            eps = torch.randn(z.shape, generator=self._noise).to(z.device)
            return z + self.strength * sigma.to(z.dtype) * eps.to(z.dtype)
        if self.kind == "permute":
            n, c, h, w = z.shape
            return z.flatten(2)[:, :, self._perm(h, w).to(z.device)].reshape(n, c, h, w)
        if self.kind == "mix":
            return torch.einsum("dc,nchw->ndhw", self.mix.to(z.dtype), z)
        return z

    def inverse_map(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "permute":
            n, c, h, w = z.shape
            return z.flatten(2)[:, :, torch.argsort(self._perm(h, w)).to(z.device)].reshape(n, c, h, w)
        if self.kind == "mix":
            return torch.einsum("cd,nchw->ndhw", self.mix.to(z.dtype), z)
        return z

    def encode_latent(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self.forward_map(self.base.encode_latent(x, sample=sample))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_latent(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.base.decode(self.inverse_map(z))


# ---------------------------------------------------------------------------------------------- spectrum

def radial_spectrum(x: torch.Tensor, transform: str = "fft") -> dict[str, np.ndarray | float]:
    """Radially averaged power spectrum of (N, C, H, W) fields, averaged over N and C.

    Power is |X|²/(H·W) of the orthonormally scaled FFT (or DCT-II), so white noise of variance σ² has a flat
    spectrum at σ². Frequencies are radii ρ in units of the Nyquist frequency (ρ = 1 at 0.5 cycles/sample
    along an axis; FFT: ρ = 2·|f|, DCT: ρ = k/N). Returns ``freq`` (bin means of ρ), ``power`` (bin means),
    ``hf_fraction``: the share of the total energy at ρ > ½."""
    if x.ndim != 4:
        raise ValueError(f"radial_spectrum: expected (N, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    xd = x.double()
    if transform == "fft":
        power = torch.fft.fft2(xd).abs().pow(2).mean(dim=(0, 1)) / (h * w)
        ry = 2.0 * torch.fft.fftfreq(h, dtype=torch.float64).abs().reshape(-1, 1)
        rx = 2.0 * torch.fft.fftfreq(w, dtype=torch.float64).abs().reshape(1, -1)
        units = max(h, w) / 2.0
    elif transform == "dct":
        from scipy.fft import dctn

        coeff = dctn(xd.cpu().numpy(), type=2, axes=(-2, -1), norm="ortho")
        power = torch.from_numpy(coeff ** 2).mean(dim=(0, 1))
        ry = (torch.arange(h, dtype=torch.float64) / h).reshape(-1, 1)
        rx = (torch.arange(w, dtype=torch.float64) / w).reshape(1, -1)
        units = float(max(h, w))
    else:
        raise UserValueError(f"unknown spectrum transform {transform!r}; choose 'fft' or 'dct'")
    rho = (ry.pow(2) + rx.pow(2)).sqrt().expand(h, w).flatten()
    p = power.flatten().cpu()
    bins = torch.round(rho * units).long()
    freq, mean_power = [], []
    for b in torch.unique(bins).tolist():
        sel = bins == b
        freq.append(float(rho[sel].mean()))
        mean_power.append(float(p[sel].mean()))
    total = float(p.sum())
    hf = float(p[rho > 0.5].sum()) / total if total > 0 else 0.0
    return {"freq": np.asarray(freq), "power": np.asarray(mean_power), "hf_fraction": hf}


# ------------------------------------------------------------------------------------------ equivariance

def spatial_transforms(factors: list[int]) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (T, divisor the latent side must have), T acting the same way on images and latents."""
    out: dict[str, tuple[Callable, int]] = {f"down{f}": ((lambda t, f=f: F.avg_pool2d(t, f)), f) for f in factors}
    out["rot90"] = ((lambda t: torch.rot90(t, 1, dims=(-2, -1))), 1)
    out["flip"] = ((lambda t: t.flip(-1)), 1)
    return out


@torch.no_grad()
def equivariance_errors(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        factors: list[int], *, mean: torch.Tensor | None = None,
                        std: torch.Tensor | None = None) -> dict[str, float | None]:
    """Relative ‖E(T x) − T E(x)‖ / ‖T E(x)‖ (sums over images) for each transform; latents are normalised by
    ``mean``/``std`` (C,) first (T preserves constants, so centring does not change the error). ``None`` where
    the latent side is not divisible by the factor or the image does not fit it."""
    def norm(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        if mean is not None:
            z = (z - mean.reshape(1, -1, 1, 1).to(z)) / std.reshape(1, -1, 1, 1).to(z)
        return z

    z = norm(encode(images))
    out: dict[str, float | None] = {}
    for name, (op, div) in spatial_transforms(factors).items():
        h, w = z.shape[-2:]
        if h % div or w % div or (div > 1 and h // div < 1):
            out[name] = None
            continue
        target = op(z)
        got = norm(encode(op(images)))
        if got.shape != target.shape:
            out[name] = None
            continue
        out[name] = float((got - target).norm() / target.norm().clamp_min(1e-30))
    return out


# ------------------------------------------------------------------------------------------------- iFID

def nearest_neighbours(flat: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row (Euclidean; ties to the lower index)."""
    d = torch.cdist(flat.double(), flat.double())
    d.fill_diagonal_(float("inf"))
    return d.argmin(dim=1)


def interpolated_latents(x: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 − w)·x_i + w·x_nn(i) for normalised latents x (N, C, h, w), with the neighbour indices."""
    nn_idx = nearest_neighbours(x.flatten(1))
    return (1.0 - weight) * x + weight * x[nn_idx], nn_idx


def fid_of(features: Callable[[torch.Tensor], np.ndarray], fake_u8: torch.Tensor, real_feats: np.ndarray) -> float:
    return frechet_distance_of_rows(features(fake_u8), real_feats)


@torch.no_grad()
def ifid(decode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, real_feats: np.ndarray,
         features: Callable[[torch.Tensor], np.ndarray], weight: float, batch_size: int = 64) -> dict:
    """iFID of normalised latents ``x`` (decoded by ``decode``, which de-normalises) against ``real_feats``."""
    mixed, nn_idx = interpolated_latents(x, weight)
    decoded = torch.cat([to_uint8(decode(mixed[i:i + batch_size]).float().clamp(-1, 1).cpu())
                         for i in range(0, mixed.shape[0], batch_size)])
    dist = (x - x[nn_idx]).flatten(1).norm(dim=1) / math.sqrt(x[0].numel())
    return {"ifid": fid_of(features, decoded, real_feats), "weight": weight,
            "nn_distance_per_dim": float(dist.mean())}


# ------------------------------------------------------------------------------- irreducible velocity var

@torch.no_grad()
def posterior_velocity_variance(reference: torch.Tensor, queries: torch.Tensor, t_grid: list[float], seed: int,
                                chunk: int = 64) -> np.ndarray:
    """Per t: E‖v − E[v | x_t]‖² / D under the empirical posterior over ``reference`` (M, D) rows, with x_t
    made from ``queries`` (Q, D) and seeded noise; Var(v | x_t) = Var(x1 | x_t) / (1 − t)²."""
    ref = reference.double().flatten(1)
    q = queries.double().flatten(1)
    dim = ref.shape[1]
    ref_sq = ref.pow(2).sum(dim=1)
    out = []
    for k, t in enumerate(t_grid):
        eps = torch.randn(q.shape, generator=generator_for(seed, "viv", k), dtype=torch.float64)
        xt = t * q + (1.0 - t) * eps
        total = 0.0
        for i in range(0, xt.shape[0], chunk):
            xb = xt[i:i + chunk]
            # ‖x_t − t r‖² = ‖x_t‖² − 2t x_t·r + t²‖r‖²; the first term is constant per query.
            logits = -(t * t * ref_sq[None] - 2.0 * t * xb @ ref.T) / (2.0 * (1.0 - t) ** 2)
            wts = torch.softmax(logits, dim=1)
            m = wts @ ref
            second = wts @ ref_sq
            total += float((second - m.pow(2).sum(dim=1)).clamp_min(0).sum())
        out.append(total / q.shape[0] / dim / (1.0 - t) ** 2)
    return np.asarray(out)


# --------------------------------------------------------------------------------------------- statistics

def latent_statistics(z: torch.Tensor, x: torch.Tensor, kl: torch.Tensor | None) -> dict:
    """Raw latents ``z`` and normalised ``x`` (N, C, h, w); ``kl`` (N,) nats per image or None."""
    c = z.shape[1]
    xd = x.double()
    per_channel = xd.transpose(0, 1).reshape(c, -1)
    kurt = (per_channel - per_channel.mean(1, keepdim=True)).pow(4).mean(1) / per_channel.var(1, unbiased=False).pow(2) - 3
    cov = torch.cov(per_channel)
    ev = torch.linalg.eigvalsh(cov).clamp_min(0)
    p = ev / ev.sum().clamp_min(1e-30)
    eff_rank = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    flat = xd.flatten(1) - xd.flatten(1).mean(0, keepdim=True)
    sv = torch.linalg.svdvals(flat).pow(2)
    energy = torch.cumsum(sv, 0) / sv.sum().clamp_min(1e-30)
    out = {"channel_mean": z.double().mean(dim=(0, 2, 3)).tolist(), "channel_std": z.double().std(dim=(0, 2, 3)).tolist(),
           "kurtosis": kurt.tolist(), "kurtosis_mean": float(kurt.mean()), "effective_rank": eff_rank,
           "channels": c, "pca_components_99": int((energy < 0.99).sum()) + 1, "flat_dim": int(flat.shape[1]),
           "kl_per_image": None, "kl_per_dim": None}
    if kl is not None:
        out["kl_per_image"] = float(kl.double().mean())
        out["kl_per_dim"] = out["kl_per_image"] / z[0].numel()
    return out


# -------------------------------------------------------------------------------------------- flow probe

class _LatentRows(torch.utils.data.Dataset):
    """(N, C, h, w) tensor as the engine's data set: item (index, seed) -> (latent, label 0)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def __len__(self) -> int:
        return self.z.shape[0]

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.z[index], torch.tensor(0)


def build_probe_dit(shape: tuple[int, int, int], *, model: str, depth: int, hidden: int, heads: int) -> nn.Module:
    c, h, _ = shape
    try:
        return build_dit_from({"name": model, "input_size": h, "in_channels": c, "num_classes": 1,
                               "class_dropout": 0.0, "depth": depth, "hidden_size": hidden, "num_heads": heads})
    except UserError as exc:  # name the keys to change: the DiT's own message speaks of its arguments
        raise UserValueError(f"diffusability.probe_model / probe_depth / probe_hidden / probe_heads: {exc}") from None


def flow_probe(train_x: torch.Tensor, heldout_x: torch.Tensor, run_dir: Path, rt: Runtime, *, t_grid: list[float],
               steps: int, batch_size: int, lr: float, seed: int, model: str = "DiT-S/2", depth: int = 4,
               hidden: int = 128, heads: int = 4, ckpt_every: int = 250, log_every: int = 50) -> tuple[dict, nn.Module]:
    """Train a small unconditional LightningDiT on normalised latents for ``steps`` (engine: seeded, resumable
    from ``run_dir/checkpoints``) and return its held-out velocity MSE per t of ``t_grid`` (fixed noise per
    held-out latent) with the trained network."""
    shape = tuple(train_x.shape[1:])
    with fixed_seed(step_seed(seed, "probe-init")):
        net = build_probe_dit(shape, model=model, depth=depth, hidden=hidden, heads=heads)
    c = shape[0]
    task = DiTTask(net, torch.zeros(c), torch.ones(c), cosine_weight=0.0, t_mean=0.0, t_std=1.0)
    spec = TrainSpec(
        name="diffusability: flow probe", model=task, param_groups=[ParamGroup("all", list(net.parameters()))],
        batches=batch_source(_LatentRows(train_x), batch_per_rank=batch_size, grad_accum=1, seed=seed),
        steps=steps, lr=lr, run_dir=Path(run_dir), betas=(0.9, 0.95), grad_clip=1.0, ckpt_every=ckpt_every,
        keep_last=2, log_every=min(log_every, steps), seed=step_seed(seed, "probe"), images_per_step=batch_size)
    train(spec, rt)
    net.eval()
    x1 = heldout_x.to(rt.device).float()
    noise = initial_noise([step_seed(seed, "probe-eval", i) for i in range(x1.shape[0])], shape, rt.device)
    y = torch.zeros(x1.shape[0], dtype=torch.long, device=rt.device)
    losses = []
    with torch.no_grad():
        for t in t_grid:
            tt = torch.full((x1.shape[0],), float(t), device=rt.device)
            losses.append(float(flow_loss(net, x1, y, t=tt, noise=noise)["mse"]))
    return {"t_grid": list(t_grid), "flow_loss": losses, "flow_loss_mean": float(np.mean(losses)),
            "probe_params": sum(p.numel() for p in net.parameters()), "steps": steps}, net


@torch.no_grad()
def probe_samples(net: nn.Module, n: int, shape: tuple[int, ...], *, steps: int, seed: int, device,
                  batch_size: int = 64) -> torch.Tensor:
    """``n`` normalised latents sampled from the probe (Euler, unconditional), per-image seeded noise."""
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        noise = initial_noise([step_seed(seed, "probe-sample", i) for i in idx], shape, device)
        y = torch.zeros(len(idx), dtype=torch.long, device=device)
        out.append(sample_ode(lambda xx, tt: net(xx, tt, y), noise, steps=steps, method="euler").cpu())
    return torch.cat(out) if out else torch.zeros((0, *shape))


# ----------------------------------------------------------------------------------------- the command

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2)


def _spread(n_total: int, n: int) -> list[int]:
    return torch.linspace(0, n_total - 1, min(n, n_total)).round().long().unique().tolist()


class _Context:
    """What the proxies share: tokenizer, image pool, encoded latents and their normalisation (built lazily)."""

    def __init__(self, cfg: Recipe, rt: Runtime, weights: str | None, out: Path) -> None:
        self.cfg, self.rt, self.out = cfg, rt, out
        d = cfg.diffusability
        if weights is not None:
            base, source = build_tokenizer(cfg, weights=weights), weights
        else:
            base, source = load_tokenizer_for_run(cfg)
        self.base = base.to(rt.device).eval()
        self.tokenizer = TransformedTokenizer(self.base, d.latent_transform, d.transform_strength,
                                              d.transform_seed).to(rt.device).eval()
        self.source = str(source) if source else None
        self.space_key = {"family": cfg.tokenizer.family, "size": cfg.tokenizer.size,
                          "overrides": cfg.tokenizer.overrides, "weights_sha256": file_sha256(source),
                          "transform": [d.latent_transform, d.transform_strength, d.transform_seed],
                          "data": [cfg.data.source, cfg.data.path, cfg.data.split, cfg.data.image_size,
                                   cfg.data.max_images, cfg.data.builtin_crops, cfg.run.seed]}
        if self.space_key["weights_sha256"] is None:
            console.print("[yellow]diffusability: the tokenizer has no weights file (random initialisation); "
                          "its cached results are keyed by the run seed only")
        self._latents = None
        self._pool = None
        self._inception = None
        self._real_feats = None

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.to(self.rt.device)
        with self.rt.autocast():
            post = self.base.encode(x)
        kl = post.kl().float().cpu() if isinstance(post, DiagonalGaussian) else None
        mean = post.mean if isinstance(post, DiagonalGaussian) else post
        return self.tokenizer.forward_map(mean.float()).cpu(), kl

    def latents(self) -> dict[str, torch.Tensor]:
        """Posterior means of ``num_latents`` images spread over the data set (cached in ``<out>/latents``)."""
        if self._latents is not None:
            return self._latents
        from safetensors.torch import save_file

        d = self.cfg.diffusability
        key = _digest({**self.space_key, "num_latents": d.num_latents})
        path = self.out / "latents" / f"latents_{key}.safetensors"
        if path.is_file():
            self._latents = read_safetensors(path, "diffusability's cached latents")
        else:
            ds = image_dataset(self.cfg, augment=False)
            picks = _spread(len(ds), d.num_latents)
            if len(picks) <= d.holdout + 1:
                raise UserValueError(f"diffusability: the data set gives {len(picks)} latents, not more than "
                                     f"diffusability.holdout ({d.holdout}) + 1; lower holdout or add images")
            zs, kls = [], []
            with make_progress(disable=not self.rt.is_main) as progress:
                task = progress.add_task("diffusability: encode", total=len(picks), status="", rate="")
                for i in range(0, len(picks), d.batch_size):
                    batch = torch.stack([ds[(j, None)][0] for j in picks[i:i + d.batch_size]])
                    z, kl = self._encode(batch)
                    zs.append(z)
                    if kl is not None:
                        kls.append(kl)
                    progress.update(task, advance=batch.shape[0])
            tensors = {"latents": torch.cat(zs).contiguous()}
            if kls:
                tensors["kl"] = torch.cat(kls)
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
            self._latents = tensors
        z = self._latents["latents"]
        train = z[: z.shape[0] - d.holdout]
        self.mean = train.double().mean(dim=(0, 2, 3)).float()
        self.std = train.double().std(dim=(0, 2, 3)).clamp_min(1e-6).float()
        return self._latents

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        self.latents()
        return (z - self.mean.reshape(1, -1, 1, 1)) / self.std.reshape(1, -1, 1, 1)

    def decode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        self.latents()
        z = x * self.std.reshape(1, -1, 1, 1) + self.mean.reshape(1, -1, 1, 1)
        with torch.no_grad(), self.rt.autocast():
            return self.tokenizer.decode(z.to(self.rt.device)).float().cpu()

    def pool(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, latents T(E(x)), KL per image or None) of the ``num_images`` pool."""
        if self._pool is None:
            images = fixed_images(self.cfg, self.cfg.diffusability.num_images)
            zs, kls = [], []
            bs = self.cfg.diffusability.batch_size
            for i in range(0, images.shape[0], bs):
                z, kl = self._encode(images[i:i + bs])
                zs.append(z)
                if kl is not None:
                    kls.append(kl)
            self._pool = (images, torch.cat(zs), torch.cat(kls) if kls else None)
        return self._pool

    def features(self):
        """Inception pool features as a callable, or None (with the reason) without weights."""
        if self._inception is None:
            self._inception = load_inception(self.cfg, self.rt.device)
        inception, note = self._inception
        if inception is None:
            return None, note
        bs = self.cfg.eval.batch_size

        def feats(u8: torch.Tensor, what: str = "Inception features") -> np.ndarray:
            rows = []
            with make_progress(disable=not self.rt.is_main) as progress:
                task = progress.add_task(f"diffusability: {what}", total=u8.shape[0], status="", rate="")
                for i in range(0, u8.shape[0], bs):
                    rows.append(inception(u8[i:i + bs])["pool"])
                    progress.update(task, advance=min(bs, u8.shape[0] - i))
            return np.concatenate(rows)

        return feats, None

    def real_features(self, feats) -> np.ndarray:
        """Inception rows of the image pool; cached across runs in ``<run.out_dir>/.cache/inception`` (every
        space of a study scores against the same images)."""
        if self._real_feats is None:
            inception = self._inception[0]
            cache = PoolFeatureCache.of(Path(self.cfg.run.out_dir) / ".cache" / "inception", inception,
                                        self.cfg.eval.batch_size)
            self._real_feats = cache.rows(to_uint8(self.pool()[0]), lambda u8: feats(u8, "data features"))
        return self._real_feats


def _stats(ctx: _Context) -> dict:
    images, z, kl = ctx.pool()
    return latent_statistics(z, ctx.normalise(z), kl)


def _spectrum(ctx: _Context) -> dict:
    images, z, _ = ctx.pool()
    kind = ctx.cfg.diffusability.spectrum
    lat = radial_spectrum(ctx.normalise(z), kind)
    im = images.double()
    im = (im - im.mean(dim=(0, 2, 3), keepdim=True)) / im.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
    img = radial_spectrum(im, kind)
    return {"transform": kind, "latent_freq": lat["freq"].tolist(), "latent_power": lat["power"].tolist(),
            "latent_hf_fraction": lat["hf_fraction"], "image_freq": img["freq"].tolist(),
            "image_power": img["power"].tolist(), "image_hf_fraction": img["hf_fraction"]}


def _equivariance(ctx: _Context) -> dict:
    cfg = ctx.cfg
    images, _, _ = ctx.pool()
    images = images.to(ctx.rt.device)
    ctx.latents()

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), ctx.rt.autocast():
            return ctx.tokenizer.encode_latent(x).float().cpu()

    errors = equivariance_errors(encode, images, cfg.diffusability.down_factors, mean=ctx.mean, std=ctx.std)
    known = [v for v in errors.values() if v is not None]
    out = {"equivariance": errors, "equivariance_mean": float(np.mean(known)) if known else None}
    r = cfg.regularizer
    try:
        grid_w, grid_h = grid_for_channels(ctx.tokenizer.latent_channels, r.grid)
    except UserError as exc:  # a grid that does not fit the latent: a note, not a failure
        out.update(blur_dynamics_error=None, blur_dynamics_note=str(exc))
        return out
    pairs = [(float(t1), float(t1 + r.delta_tau)) for t1 in np.linspace(0.0, r.tau_max - r.delta_tau, 4)]
    dynamics = dynamics_from_config(r, ctx.tokenizer.latent_channels, image_size=cfg.data.image_size,
                                    seed=cfg.run.seed)
    with torch.no_grad():
        err = dynamics_error(ctx.tokenizer, images, dynamics, pairs, mean_centering=r.mean_centering)
    out.update(blur_dynamics_error=err["relative"], blur_no_change_error=err["no_change"],
               blur_tau_pairs=[list(p) for p in pairs], blur_basis=f"{r.basis} {grid_w}x{grid_h}")
    return out


def _ifid(ctx: _Context) -> dict:
    feats, note = ctx.features()
    if feats is None:
        return {"ifid": None, "ifid_note": note}
    _, z, _ = ctx.pool()
    d = ctx.cfg.diffusability
    res = ifid(ctx.decode_normalised, ctx.normalise(z), ctx.real_features(feats), feats, d.ifid_weight, d.batch_size)
    res["ifid_weight"] = res.pop("weight")
    res["ifid_images"] = z.shape[0]
    return res


def _viv(ctx: _Context) -> dict:
    d = ctx.cfg.diffusability
    x = ctx.normalise(ctx.latents()["latents"])
    ref, queries = x[: x.shape[0] - d.holdout], x[x.shape[0] - d.holdout:]
    viv = posterior_velocity_variance(ref, queries, d.t_grid, seed=step_seed(ctx.cfg.run.seed, "viv"))
    return {"t_grid": list(d.t_grid), "viv": viv.tolist(), "viv_mean": float(viv.mean()),
            "viv_reference": int(ref.shape[0]), "viv_queries": int(queries.shape[0])}


def _flow_probe(ctx: _Context, run_dir: Path) -> dict:
    d = ctx.cfg.diffusability
    x = ctx.normalise(ctx.latents()["latents"])
    train_x, held = x[: x.shape[0] - d.holdout], x[x.shape[0] - d.holdout:]
    res, net = flow_probe(train_x, held, run_dir, ctx.rt, t_grid=d.t_grid, steps=d.probe_steps,
                          batch_size=d.probe_batch, lr=d.probe_lr, seed=ctx.cfg.run.seed, model=d.probe_model,
                          depth=d.probe_depth, hidden=d.probe_hidden, heads=d.probe_heads,
                          ckpt_every=d.probe_ckpt_every)
    res["train_latents"] = int(train_x.shape[0])
    res["flow_fid"] = None
    feats, note = ctx.features()
    if d.probe_samples and feats is not None:
        samples = probe_samples(net, d.probe_samples, tuple(x.shape[1:]), steps=d.sample_steps,
                                seed=ctx.cfg.run.seed, device=ctx.rt.device, batch_size=d.batch_size)
        decoded = torch.cat([to_uint8(ctx.decode_normalised(samples[i:i + d.batch_size]).clamp(-1, 1))
                             for i in range(0, samples.shape[0], d.batch_size)])
        res["flow_fid"] = fid_of(feats, decoded, ctx.real_features(feats))
        res["flow_fid_samples"] = d.probe_samples
    elif feats is None:
        res["flow_fid_note"] = note
    return res


def _proxy_key(cfg: Recipe, ctx: _Context, name: str) -> str:
    d = cfg.diffusability.model_dump()
    for k in ("proxies", "batch_size"):
        d.pop(k)
    return _digest({"space": ctx.space_key, "settings": d, "regularizer": cfg.regularizer.model_dump(),
                    "inception": cfg.eval.inception_weights, "proxy": name, "seed": cfg.run.seed})


def run_diffusability(cfg: Recipe, rt: Runtime, *, weights: str | None = None, out_dir: Path | None = None) -> dict:
    """Compute the recipe's proxies (cached per proxy) and write ``diffusability.json`` + a figure."""
    out = Path(out_dir) if out_dir else cfg.run_dir() / "diffusability"
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(cfg, rt, weights, out)
    runners = {"stats": _stats, "spectrum": _spectrum, "equivariance": _equivariance, "ifid": _ifid, "viv": _viv,
               "flow_probe": lambda c: _flow_probe(c, out / "flow_probe")}
    result: dict = {"tokenizer": f"{cfg.tokenizer.family}/{cfg.tokenizer.size}", "weights": ctx.source,
                    "latent_transform": [cfg.diffusability.latent_transform, cfg.diffusability.transform_strength],
                    "seed": cfg.run.seed, "proxies": {}, "seconds": {}}
    for name in cfg.diffusability.proxies:
        key = _proxy_key(cfg, ctx, name)
        part = out / "parts" / f"{name}.json"
        cached = json.loads(part.read_text()) if part.is_file() else None
        if cached is not None and cached.get("key") == key:
            value, seconds = cached["value"], cached.get("seconds")
            console.print(f"diffusability: {name} already computed ({part})")
        else:
            if name == "flow_probe" and cached is not None:
                # Settings changed: the old probe's checkpoints belong to another run.
                shutil.rmtree(out / "flow_probe", ignore_errors=True)
            started = time.perf_counter()
            value = runners[name](ctx)
            # wall time of this computation (a resumed flow probe: since the resume; shared work such as encoding
            # the latents or the data's Inception features counts in the first proxy that needs it)
            seconds = round(time.perf_counter() - started, 1)
            if rt.is_main:
                _write_json(part, {"key": key, "value": value, "seconds": seconds})
        result["proxies"][name] = value
        result["seconds"][name] = seconds
    result["summary"] = summary(result)
    if rt.is_main:
        _write_json(out / "diffusability.json", result)
        result["figure"] = str(plot_diffusability({cfg.run.name: result}, out / "diffusability.png"))
        _write_json(out / "diffusability.json", result)
        print_summary({cfg.run.name: result}, out)
    return result


def summary(result: dict) -> dict:
    """The ranked scalars (``RANKED`` keys) of one result, None where a proxy was not computed."""
    flat: dict = {}
    for value in result["proxies"].values():
        flat.update({k: v for k, v in value.items() if not isinstance(v, (list, dict))})
    return {key: flat.get(key) for key, _, _ in RANKED}


def ranking(results: dict[str, dict]) -> dict[str, list[str]]:
    """Per ranked proxy, the labels ordered best first (labels without the value are left out)."""
    out = {}
    for key, _, lower in RANKED:
        have = [(r["summary"].get(key), label) for label, r in results.items() if r["summary"].get(key) is not None]
        out[key] = [label for _, label in sorted(have, key=lambda p: p[0] if lower else -p[0])]
    return out


def ranking_markdown(results: dict[str, dict]) -> str:
    labels = list(results)
    ranks = ranking(results)
    lines = ["| proxy | better | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, name, lower in RANKED:
        cells = []
        for label in labels:
            value = results[label]["summary"].get(key)
            cells.append("—" if value is None else f"{value:.4g} (#{ranks[key].index(label) + 1})")
        lines.append(f"| {name} | {'lower' if lower else 'higher'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(results: dict[str, dict], out: Path, name: str = "ranking.md") -> Path:
    ranks = ranking(results)
    rows = []
    for key, proxy, _ in RANKED:
        cells = []
        for label, r in results.items():
            v = r["summary"].get(key)
            cells.append("—" if v is None else (f"{v:.4g}" + (f" (#{ranks[key].index(label) + 1})"
                                                               if len(results) > 1 else "")))
        rows.append((proxy, *cells))
    print_result_table("ssr diffusability" + (": comparison (rank in brackets)" if len(results) > 1 else ""),
                       ["proxy"], list(results), rows)
    path = Path(out) / name
    write_text_atomic(path, ranking_markdown(results))
    console.print(f"diffusability: results in {out}")
    return path


def plot_diffusability(results: dict[str, dict], path: Path) -> Path:
    """Latent spectra (the image spectrum dashed), the probe's per-t held-out loss and the VIV floor."""
    import matplotlib  # lazy: only this figure needs matplotlib, and pipeline/commands import this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use above

    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(10, 3.8))
    image_drawn = False
    for i, (label, r) in enumerate(results.items()):
        color = f"C{i % 10}"
        spec = r["proxies"].get("spectrum")
        if spec:
            ax_s.semilogy(spec["latent_freq"], spec["latent_power"], marker="o", ms=3, color=color, label=label)
            if not image_drawn:
                ax_s.semilogy(spec["image_freq"], spec["image_power"], "--", color="grey", label="images")
                image_drawn = True
        probe = r["proxies"].get("flow_probe")
        if probe:
            ax_l.plot(probe["t_grid"], probe["flow_loss"], marker="o", ms=3, color=color, label=f"{label} probe")
        viv = r["proxies"].get("viv")
        if viv:
            ax_l.plot(viv["t_grid"], viv["viv"], ":", color=color, label=f"{label} VIV (NN posterior)")
    ax_s.axvline(0.5, color="k", lw=0.6, alpha=0.5)
    ax_s.set_xlabel("radial frequency / Nyquist")
    ax_s.set_ylabel("power (normalised)")
    ax_s.set_title("radially averaged power spectrum")
    ax_l.set_xlabel("t (0 = noise, 1 = data)")
    ax_l.set_ylabel("velocity MSE per dim")
    ax_l.set_title("held-out flow loss vs t")
    for ax in (ax_s, ax_l):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    # a fixed layout in inches instead of tight_layout, whose extra pass lays out every text again (half the
    # figure's cost; it is drawn by every run of the command)
    fig.subplots_adjust(left=0.8 / 10, right=1 - 0.2 / 10, bottom=0.55 / 3.8, top=1 - 0.35 / 3.8, wspace=0.22)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ssr_cli.plots import _save

    return _save(fig, path, 120, tight=False)


def compare_diffusability(results: dict[str, dict], out_dir: Path) -> dict:
    """Several results (label -> :func:`run_diffusability` result) side by side: one figure, one ranking."""
    out = Path(out_dir)
    fig = plot_diffusability(results, out / "compare_diffusability.png")
    table = print_summary(results, out, "compare_ranking.md")
    _write_json(out / "compare_diffusability.json",
                {"runs": {k: v["summary"] for k, v in results.items()}, "ranking": ranking(results),
                 "figure": str(fig), "table": str(table)})
    return {"figure": fig, "ranking": ranking(results)}


# -- the stage protocol (one module per command) -----------------------------------------------------------
NAME = "diffusability"


def is_complete(cfg: Recipe) -> bool:
    """``diffusability.json`` is written; each proxy's part is cached by the digest of its inputs, so a rerun
    recomputes only what changed."""
    return (cfg.run_dir() / "diffusability" / "diffusability.json").is_file()


def run(cfg: Recipe, rt: Runtime, **options):
    """:func:`run_diffusability` (``options``: weights, out_dir)."""
    return run_diffusability(cfg, rt, **options)
