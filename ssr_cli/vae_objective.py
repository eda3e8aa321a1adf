"""The objective of the vector-latent VAEs (:mod:`ssr_cli.models.s4d`) and what watches it during training:
the NELBO, the KL-weight schedules against posterior collapse, and the posterior-collapse alarm.

The VAE objective (:func:`nelbo`) uses a Gaussian decoder p(x|z) = N(x; decode(z), σ_x² I) over the 3·H·W
pixel values in the toolkit's [−1, 1] units, with one learned σ_x per model (``log_sigma_x``, the
"calibrated decoder" of the σ-VAE; fixed with ``learn_sigma_x=False``); its negative log-density is in nats
per image. A density on [0, 1] units would be larger by 3·H·W·log 2 nats (the Jacobian of x ↦ (x+1)/2).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from ssr_cli.errors import UserValueError
from ssr_cli.models.s4d import _VectorVAE
from ssr_cli.models.tokenizer import DiagonalGaussian

log = logging.getLogger("ssr.models.s4d")  # the name from before the move out of models/s4d.py: filters still match


# ----------------------------------------------------------------------------------------------- objective


def kl_per_dim(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z_d|x) ‖ N(0, 1)) per latent element, averaged over the batch: (D,) for a (B, D, 1, 1) posterior, nats."""
    mean = posterior.mean.flatten(1).float()
    logvar = posterior.logvar.flatten(1).float()
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).mean(dim=0)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, σ² I) summed over all but the batch dim, nats: (B,). log_sigma a scalar or broadcastable."""
    log_sigma = log_sigma.float()
    z = (x.float() - mean.float()) * torch.exp(-log_sigma)
    per_elem = 0.5 * z.pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)
    return per_elem.flatten(1).sum(dim=1)


def nelbo(model: _VectorVAE, x: torch.Tensor, kl_weight: float = 1.0,
          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The VAE objective on images x (B, 3, S, S) in [−1, 1], one posterior sample per image.

    Likelihood: Gaussian N(x; decode(z), σ_x² I) over the 3·S·S values in [−1, 1] units, σ_x = model.sigma_x.
    Returns float32 scalars averaged over the batch, in nats per image unless said otherwise:
      loss      rec + kl_weight·kl (what to minimise; equals nelbo when kl_weight = 1)
      nelbo     rec + kl, the negative ELBO (independent of kl_weight: comparable across schedules)
      rec       −log p(x|z)
      kl        KL(q(z|x) ‖ N(0, I)) summed over latent dims
      nelbo_per_dim  nelbo / (3·S·S), nats per pixel value
      mse       mean squared error of the reconstruction ([−1, 1] units, per element)
      sigma_x   the decoder std
    and kl_per_dim (D,) (batch-mean KL of each latent dimension, for :class:`PosteriorCollapseAlarm`).
    """
    posterior = model.encode(x)
    z = posterior.sample(generator)
    x_rec = model.decode(z)
    rec = gaussian_nll(x, x_rec, model.log_sigma_x).mean()
    per_dim = kl_per_dim(posterior)
    kl = per_dim.sum()
    total = rec + kl
    return {
        "loss": rec + float(kl_weight) * kl,
        "nelbo": total,
        "rec": rec,
        "kl": kl,
        "nelbo_per_dim": total / x[0].numel(),
        "mse": (x_rec.float() - x.float()).pow(2).mean(),
        "sigma_x": model.sigma_x.detach().float(),
        "kl_per_dim": per_dim,
    }


KL_SCHEDULES = ("none", "linear_warmup", "cyclical")


def kl_weight_schedule(step: int, kind: str = "none", *, warmup_steps: int = 0, max_weight: float = 1.0,
                       start_weight: float = 0.0, cycle_steps: int = 0, ramp_fraction: float = 0.5) -> float:
    """KL weight β at ``step`` (0-based) against posterior collapse.

    none: ``max_weight`` throughout. linear_warmup: from ``start_weight`` to ``max_weight`` linearly over
    ``warmup_steps``, then constant (Bowman et al. 2016). cyclical (Fu et al. 2019): the step axis is cut into
    cycles of ``cycle_steps``; in each, β ramps linearly from ``start_weight`` to ``max_weight`` over the first
    ``ramp_fraction`` of the cycle and then holds.
    """
    if kind == "none":
        return float(max_weight)
    if kind == "linear_warmup":
        if warmup_steps <= 0:
            raise UserValueError(f"kl_schedule 'linear_warmup' needs warmup_steps > 0, got {warmup_steps}")
        progress = min(1.0, max(0, step) / warmup_steps)
    elif kind == "cyclical":
        if cycle_steps <= 0:
            raise ValueError(f"kl_schedule 'cyclical' needs cycle_steps > 0, got {cycle_steps}")
        if not 0 < ramp_fraction <= 1:
            raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}")
        progress = min(1.0, (max(0, step) % cycle_steps) / (ramp_fraction * cycle_steps))
    else:
        raise UserValueError(f"kl schedule kind must be one of {', '.join(KL_SCHEDULES)}, got {kind!r}")
    return float(start_weight + (max_weight - start_weight) * progress)


class PosteriorCollapseWarning(RuntimeWarning):
    """Raised as a warning when the latent stops carrying information."""


class PosteriorCollapseAlarm:
    """Watches the per-dimension KL and fires when the posterior has collapsed onto the prior.

    A latent dimension counts as collapsed at a step when its batch-mean KL is below
    ``threshold_nats_per_dim``; the alarm fires once at least ``collapsed_fraction`` of the dimensions (default:
    all of them) have been collapsed for ``patience_steps`` consecutive updates. On firing it logs an ERROR
    and emits a :class:`PosteriorCollapseWarning` with ``message`` (once per episode: it re-arms after a step
    without collapse). ``update`` returns True on every step while the collapse persists.

    ``grace_steps``: the first updates are not judged. A freshly initialised encoder outputs μ ≈ 0 and the
    decoder needs some steps before it uses z, so every VAE starts out "collapsed"; set it to the KL warm-up
    length or a few hundred steps.
    """

    def __init__(self, threshold_nats_per_dim: float = 0.01, patience_steps: int = 200,
                 collapsed_fraction: float = 1.0, grace_steps: int = 0) -> None:
        if threshold_nats_per_dim <= 0:
            raise UserValueError(f"threshold_nats_per_dim must be > 0, got {threshold_nats_per_dim}")
        if patience_steps < 1:
            raise ValueError(f"patience_steps must be >= 1, got {patience_steps}")
        if not 0 < collapsed_fraction <= 1:
            raise ValueError(f"collapsed_fraction must be in (0, 1], got {collapsed_fraction}")
        if grace_steps < 0:
            raise ValueError(f"grace_steps must be >= 0, got {grace_steps}")
        self.grace_steps = int(grace_steps)
        self.updates = 0
        self.threshold = float(threshold_nats_per_dim)
        self.patience_steps = int(patience_steps)
        self.collapsed_fraction = float(collapsed_fraction)
        self.streak = 0
        self.fired = False
        self.collapsed_dims = 0
        self.message = ""

    def update(self, kl_per_dim: torch.Tensor) -> bool:
        """kl_per_dim: (D,) batch-mean KL per latent dimension (nats). Returns True while the alarm is firing."""
        kl = torch.as_tensor(kl_per_dim).detach().float().flatten()
        if kl.numel() == 0:
            raise ValueError("kl_per_dim is empty: pass the (D,) per-dimension KL from nelbo()['kl_per_dim']")
        dims = kl.numel()
        self.collapsed_dims = int((kl < self.threshold).sum())
        needed = math.ceil(self.collapsed_fraction * dims - 1e-9)
        self.updates += 1
        if self.collapsed_dims >= needed and self.updates > self.grace_steps:
            self.streak += 1
        else:
            self.streak = 0
            self.fired = False
        firing = self.streak >= self.patience_steps
        if firing and not self.fired:
            self.fired = True
            self.message = (
                f"POSTERIOR COLLAPSE: {self.collapsed_dims}/{dims} latent dims have KL < {self.threshold:g} nats "
                f"for {self.streak} consecutive steps (total KL {float(kl.sum()):.4g} nats): the decoder ignores "
                f"the latent. Try a KL warm-up (kl_schedule = 'linear_warmup' or 'cyclical'), a smaller "
                f"max KL weight, or a smaller/fixed sigma_x."
            )
            log.error(self.message)
            warnings.warn(self.message, PosteriorCollapseWarning, stacklevel=2)
        return firing
