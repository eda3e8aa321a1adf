"""The fine-tuning objectives of ``ssr finetune``: reconstruction, SSR, EQ-VAE and FT-SE (method.md §3).

Every regularizer is an ``nn.Module`` (SSR owns the learnable A and Δ: :class:`ssr_cli.dynamics.SSRDynamics`)
with one call,
``loss(tokenizer, x, *, step_rng, target_encoder) -> dict[str, Tensor]``: ``"loss"`` is what to minimise,
the other entries are scalar terms for metrics.jsonl. A regularizer always returns the same keys; terms of
the branch not taken this step are 0, so a log window's mean of a branch term equals
(mean over the steps that took the branch) × (mean of ``branch``).

Randomness: which branch a step takes (and EQ-VAE's scale/rotation, FT-SE's factor) is drawn from
``step_rng``, a generator the trainer seeds identically on every rank for a step, so all ranks agree and a
run is reproducible. Per-image draws (the blur variances τ, posterior samples) use torch's global RNG,
which the trainer seeds per (rank, step): different images get different τ on every rank.

Loss conventions (images in [-1, 1]):
- MAE: mean absolute error over all pixel elements; LPIPS: mean over the batch of ``lpips_fn`` (B,).
- KL (KL tokenizers only): the ``kl`` term is KL(q‖N(0, I)) summed over the latent elements and averaged
  over the batch (nats per image, the number LDM/EQ-VAE log and the paper's Fig. 4(b) reports). In the loss it
  enters as ``kl_weight · kl / (3·H·W)``: LDM/EQ-VAE sum the L1 + LPIPS error over the pixels of an image
  and add ``kl_weight · KL``; dividing that whole objective by the pixel count gives our per-element MAE
  plus this KL term, so ``kl_weight = 1e-6`` keeps the meaning it has in those code bases.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssr_cli.blur import gaussian_blur, sample_tau_pairs
from ssr_cli.dynamics import SSRDynamics, build_dynamics
from ssr_cli.errors import UserValueError
from ssr_cli.models.tokenizer import DiagonalGaussian, latent_of
from ssr_cli.recipe import LossConfig, RegularizerConfig

LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TargetEncoder = Callable[[torch.Tensor], torch.Tensor]

KINDS = ("ssr", "eq_vae", "scale", "none")

# EQ-VAE (zelaki/eqvae): scale factors s ∈ {8/32, …, 31/32} and rot90 by k ∈ {1, 2, 3} quarter turns.
EQ_SCALES = tuple(s / 32 for s in range(8, 32))
EQ_ROTATIONS = (1, 2, 3)


# ----------------------------------------------------------------------------------------------- helpers


def _rng_device(step_rng: torch.Generator | None) -> torch.device:
    return step_rng.device if step_rng is not None else torch.device("cpu")


def _uniform(step_rng: torch.Generator | None) -> float:
    """One U[0, 1) draw from the step generator, or from torch's global (CPU) RNG when None."""
    return float(torch.rand((), generator=step_rng, device=_rng_device(step_rng)))


def _choice(options: tuple, step_rng: torch.Generator | None):
    index = int(torch.randint(len(options), (), generator=step_rng, device=_rng_device(step_rng)))
    return options[index]


def _zero(ref: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=ref.device, dtype=torch.float32)


def _decode_latent(tokenizer, posterior: DiagonalGaussian | torch.Tensor) -> torch.Tensor:
    """The latent the decoder sees in training: a posterior sample in train mode (as Tokenizer.forward)."""
    return latent_of(posterior, sample=tokenizer.training)


def reconstruction_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    *,
    lambda_mae: float = 1.0,
    lambda_lpips: float = 0.1,
    lpips_fn: LpipsFn | None = None,
    posterior: DiagonalGaussian | torch.Tensor | None = None,
    kl_weight: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """λ_MAE·MAE + λ_LPIPS·LPIPS + kl_weight·KL/(pixel elements per image) between target and reconstruction.

    x, x_rec: (B, 3, H, W) in [-1, 1] (x_rec unclamped). lpips_fn(x_rec, x) -> (B,); None or λ_LPIPS = 0: no
    LPIPS term. posterior: the encoder's result; a DiagonalGaussian adds the KL term (see the module
    docstring for the normalisation), a tensor (deterministic AE) or None adds none.
    Returns float32 scalars: loss, mae, lpips, kl (kl = per-image KL summed over latent elements, batch mean).
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(x_rec.shape)} vs {tuple(x.shape)}")
    mae = (x_rec.float() - x.float()).abs().mean()
    lpips = _zero(x)
    if lpips_fn is not None and lambda_lpips > 0:
        lpips = lpips_fn(x_rec, x).float().mean()
    kl = _zero(x)
    if isinstance(posterior, DiagonalGaussian):
        kl = posterior.kl().float().mean()
    pixels_per_image = x[0].numel()
    loss = lambda_mae * mae + lambda_lpips * lpips + (kl_weight / pixels_per_image) * kl
    return {"loss": loss, "mae": mae, "lpips": lpips, "kl": kl}


LATENT_LOSSES = ("centred", "carried_mean")
LATENT_SPACES = ("scaled", "raw")


def latent_mse(z2_hat: torch.Tensor, z2: torch.Tensor, reading: str = "centred") -> torch.Tensor:
    """The SSR latent term between ẑ2 = mean(z1) + Ā·C(z1) and the target z2, (B, C, h, w).

    ``centred`` (paper eq. 24 read literally): MSE(C(z2), Ā·C(z1)) = MSE(C(z2), C(ẑ2)) — channel means are free to
    move under blur (as the paper's Fig. 5 shows they do). ``carried_mean``: MSE(z2, ẑ2), which equals the centred
    loss plus the mean of ‖mean(z2) − mean(z1)‖² over channels (Ā·C(z1) has zero spatial mean): it also pins
    the channel means to their sharp values.
    """
    if reading == "carried_mean":
        return F.mse_loss(z2_hat.float(), z2.float())
    if reading != "centred":
        raise UserValueError(f"latent loss reading must be one of {', '.join(LATENT_LOSSES)}, got {reading!r}")
    centre = lambda z: z.float() - z.float().mean(dim=(-2, -1), keepdim=True)  # noqa: E731
    return F.mse_loss(centre(z2_hat), centre(z2))


# ----------------------------------------------------------------------------------------------- regularizers


class Regularizer(nn.Module):
    """Base: the reconstruction branch, shared by every kind."""

    kind = "none"

    def __init__(
        self,
        *,
        lambda_mae: float = 1.0,
        lambda_lpips: float = 0.1,
        kl_weight: float = 1e-6,
        lpips_fn: LpipsFn | None = None,
    ) -> None:
        super().__init__()
        self.lambda_mae = lambda_mae
        self.lambda_lpips = lambda_lpips
        self.kl_weight = kl_weight
        # kept out of nn.Module registration even when it is the LPIPS module itself: frozen, not checkpointed
        self.__dict__["lpips_fn"] = lpips_fn

    def _recon(self, target: torch.Tensor, x_rec: torch.Tensor, posterior=None) -> dict[str, torch.Tensor]:
        return reconstruction_loss(target, x_rec, lambda_mae=self.lambda_mae, lambda_lpips=self.lambda_lpips,
                                   lpips_fn=self.lpips_fn, posterior=posterior, kl_weight=self.kl_weight)

    def reconstruction_terms(self, tokenizer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode, decode (a posterior sample in train mode), and the reconstruction loss; keys recon/mae/lpips/kl."""
        posterior = tokenizer.encode(x)
        terms = self._recon(x, tokenizer.decode(_decode_latent(tokenizer, posterior)), posterior)
        return {"recon": terms["loss"], "mae": terms["mae"], "lpips": terms["lpips"], "kl": terms["kl"]}

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1]. Returns loss (= recon), recon, mae, lpips, kl."""
        terms = self.reconstruction_terms(tokenizer, x)
        return {"loss": terms["recon"], **terms}


class NoneRegularizer(Regularizer):
    """Reconstruction only (the fine-tuned baseline)."""

    kind = "none"


class SSRRegularizer(Regularizer):
    """Structured state-space regularization (paper §4.3, eq. 23; method.md §3).

    With probability ``alpha`` (drawn from step_rng) a step takes the SSR branch, else the reconstruction
    branch. SSR branch, per image: τ1 ~ p(x) = (2/L)(1 − x/L) on [0, L], L = tau_max − delta_tau, τ2 = τ1 + Δ_I;
    I1 = blur(x, τ1), I2 = blur(x, τ2); z1 = E(I1) with the trained encoder; z2 = E_ema(I2) from
    ``target_encoder`` without gradient; ẑ2 = dynamics.predict(z1);
    loss = λ_z·MSE(z2, ẑ2) + λ_I·(λ_MAE·MAE(I2, D(ẑ2)) + λ_LPIPS·LPIPS(I2, D(ẑ2))).

    ``latent_space``: "scaled" (default) reads z1, z2 in the tokenizer's scaled space z = scale·(raw − shift) (the
    latent the generator sees; for Flux λ_z then weighs like 0.13× a raw-latent MSE), "raw" in the raw posterior
    mean (z/scale + shift); the prediction is mapped back to the scaled space before decoding.
    z1 is the posterior mean for KL tokenizers (the paper writes z1 = E(I_τ1) as a deterministic map, and the
    EMA target is a mean too: a sample would add the posterior noise to the latent MSE and push σ → 0).
    target_encoder=None falls back to the trained encoder under no_grad (stop-gradient, no EMA).
    """

    kind = "ssr"

    def __init__(
        self,
        dynamics: SSRDynamics,
        *,
        alpha: float = 0.25,
        lambda_latent: float = 0.25,
        lambda_image: float = 1.0,
        lambda_mae_ssr: float = 1.0,
        lambda_lpips_ssr: float = 0.1,
        mean_centering: bool = True,
        latent_loss: str = "centred",
        latent_space: str = "scaled",
        tau_max: float = 10.0,
        delta_tau: float = 4.0,
        **recon_kwargs,
    ) -> None:
        super().__init__(**recon_kwargs)
        if latent_loss not in LATENT_LOSSES:
            raise UserValueError(f"regularizer.latent_loss must be one of {', '.join(LATENT_LOSSES)}, got "
                                 f"{latent_loss!r}")
        if latent_space not in LATENT_SPACES:
            raise UserValueError(f"regularizer.latent_space must be one of {', '.join(LATENT_SPACES)}, "
                                 f"got {latent_space!r}")
        if not 0.0 <= alpha <= 1.0:
            raise UserValueError(f"regularizer.alpha must be in [0, 1], got {alpha}")
        if not 0 < delta_tau <= tau_max:
            raise UserValueError(f"need 0 < regularizer.delta_tau ({delta_tau}) <= regularizer.tau_max ({tau_max})")
        self.dynamics = dynamics
        self.alpha = alpha
        self.lambda_latent = lambda_latent
        self.lambda_image = lambda_image
        self.lambda_mae_ssr = lambda_mae_ssr
        self.lambda_lpips_ssr = lambda_lpips_ssr
        self.mean_centering = mean_centering
        self.latent_loss = latent_loss
        self.latent_space = latent_space
        self.tau_max = tau_max
        self.delta_tau = delta_tau

    def _raw_space(self, tokenizer) -> tuple[bool, float, float]:
        """(read raw latents?, scale, shift): raw only when latent_space = "raw" and the tokenizer rescales."""
        scale, shift = float(tokenizer.scale_factor), float(tokenizer.shift_factor)
        return self.latent_space == "raw" and (scale != 1.0 or shift != 0.0), scale, shift

    def predict_scaled(self, tokenizer, z1: torch.Tensor) -> torch.Tensor:
        """ẑ2 in the tokenizer's scaled space (what the decoder takes) from the scaled z1, under latent_space."""
        raw, scale, shift = self._raw_space(tokenizer)
        if not raw:
            return self.dynamics.predict(z1, mean_centering=self.mean_centering)
        return scale * (self.dynamics.predict(z1.float() / scale + shift, mean_centering=self.mean_centering) - shift)

    def ssr_terms(self, tokenizer, x: torch.Tensor, tau1: torch.Tensor,
                  target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """The SSR branch for given τ1 (B,), τ2 = τ1 + delta_tau.

        Returns ssr (the branch loss), ssr_latent, ssr_pixel, ssr_mae, ssr_lpips.
        """
        tau1 = tau1.to(x.device)
        with torch.no_grad():
            i1 = gaussian_blur(x, tau1)
            i2 = gaussian_blur(x, tau1 + self.delta_tau)
        z1 = latent_of(tokenizer.encode(i1), sample=False)
        with torch.no_grad():
            z2 = target_encoder(i2) if target_encoder is not None else tokenizer.encode_latent(i2)
        z2 = z2.detach()
        raw, scale, shift = self._raw_space(tokenizer)
        if raw:  # the raw posterior means, before the tokenizer's z = scale·(raw − shift)
            z1, z2 = z1.float() / scale + shift, z2.float() / scale + shift
        z2_hat = self.dynamics.predict(z1, mean_centering=self.mean_centering)
        latent = latent_mse(z2_hat, z2.float(), "centred" if self.mean_centering and self.latent_loss == "centred"
                            else "carried_mean")
        x2_hat = tokenizer.decode(scale * (z2_hat - shift) if raw else z2_hat)
        mae = (x2_hat.float() - i2.float()).abs().mean()
        lpips = _zero(x)
        if self.lpips_fn is not None and self.lambda_lpips_ssr > 0:
            lpips = self.lpips_fn(x2_hat, i2).float().mean()
        pixel = self.lambda_mae_ssr * mae + self.lambda_lpips_ssr * lpips
        total = self.lambda_latent * latent + self.lambda_image * pixel
        return {"ssr": total, "ssr_latent": latent, "ssr_pixel": pixel, "ssr_mae": mae, "ssr_lpips": lpips}

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, branch (1 = SSR), recon, mae, lpips, kl, ssr_latent, ssr_pixel, delta, abar_norm.

        abar_norm is the spectral norm ‖Ā‖₂ (the paper notes ‖Ā‖ < 1; exactly 1 for Fourier, whose DC mode
        has a = 0).
        """
        take_ssr = _uniform(step_rng) < self.alpha
        zero = _zero(x)
        out = {"recon": zero, "mae": zero, "lpips": zero, "kl": zero, "ssr_latent": zero, "ssr_pixel": zero}
        if take_ssr:
            tau1, _ = sample_tau_pairs(x.shape[0], self.tau_max, self.delta_tau, device=x.device)
            terms = self.ssr_terms(tokenizer, x, tau1, target_encoder)
            out.update(ssr_latent=terms["ssr_latent"], ssr_pixel=terms["ssr_pixel"])
            total = terms["ssr"]
        else:
            out.update(self.reconstruction_terms(tokenizer, x))
            total = out["recon"]
        with torch.no_grad():
            delta = self.dynamics.delta.detach().float()
            abar_norm = torch.linalg.matrix_norm(self.dynamics.a_bar().detach(), ord=2).float()
        return {"loss": total, "branch": torch.tensor(float(take_ssr), device=x.device), **out,
                "delta": delta, "abar_norm": abar_norm}


class EQVAERegularizer(Regularizer):
    """EQ-VAE (Kouzelis et al. 2025; zelaki/eqvae): with probability ``p_equivariance`` (0.5) decode a
    transformed latent and match the equally transformed image.

    Transform (one per step, from step_rng): bilinear rescale by s ∈ {8/32, …, 31/32} then rot90 by
    k ∈ {1, 2, 3}. The latent (h, w) goes to (⌊s·h⌋, ⌊s·w⌋) and the image to exactly f times that (f = H/h),
    so decoder output and target always have the same size; bilinear, align_corners=False, no antialias, as
    EQ-VAE. The decoded latent is a posterior sample in train mode and the KL of the posterior is kept,
    as in EQ-VAE. (EQ-VAE's extra low-resolution "prior preservation" in its other branch is not included.)
    """

    kind = "eq_vae"

    def __init__(self, *, p_equivariance: float = 0.5, **recon_kwargs) -> None:
        super().__init__(**recon_kwargs)
        if not 0.0 <= p_equivariance <= 1.0:
            raise ValueError(f"EQ-VAE branch probability must be in [0, 1], got {p_equivariance}")
        self.p_equivariance = p_equivariance

    @staticmethod
    def transform_pair(
        z: torch.Tensor, x: torch.Tensor, scale: float, quarter_turns: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale z (B, C, h, w) and x (B, 3, H, W) by ``scale`` (bilinear) and rotate both by k·90°."""
        h, w = z.shape[-2:]
        fy, fx = x.shape[-2] // h, x.shape[-1] // w
        hs, ws = max(1, int(math.floor(scale * h))), max(1, int(math.floor(scale * w)))
        zt = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
        xt = F.interpolate(x, size=(hs * fy, ws * fx), mode="bilinear", align_corners=False)
        return torch.rot90(zt, quarter_turns, dims=(-1, -2)), torch.rot90(xt, quarter_turns, dims=(-1, -2))

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, branch (1 = equivariance), recon, mae, lpips, kl, eq, eq_scale, eq_quarter_turns."""
        take_eq = _uniform(step_rng) < self.p_equivariance
        zero = _zero(x)
        out = {"recon": zero, "mae": zero, "lpips": zero, "kl": zero, "eq": zero,
               "eq_scale": zero, "eq_quarter_turns": zero}
        if take_eq:
            scale = _choice(EQ_SCALES, step_rng)
            turns = _choice(EQ_ROTATIONS, step_rng)
            posterior = tokenizer.encode(x)
            z_t, x_t = self.transform_pair(_decode_latent(tokenizer, posterior), x, scale, turns)
            terms = self._recon(x_t, tokenizer.decode(z_t), posterior)
            out.update(eq=terms["loss"], mae=terms["mae"], lpips=terms["lpips"], kl=terms["kl"],
                       eq_scale=torch.tensor(scale, device=x.device),
                       eq_quarter_turns=torch.tensor(float(turns), device=x.device))
            total = terms["loss"]
        else:
            out.update(self.reconstruction_terms(tokenizer, x))
            total = out["recon"]
        return {"loss": total, "branch": torch.tensor(float(take_eq), device=x.device), **out}


class ScaleRegularizer(Regularizer):
    """FT-SE, scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders").

    Every step: the reconstruction loss of x plus ``se_weight`` × the reconstruction loss of the ×f
    downsampled image against the decoded ×f downsampled latent, f ∈ ``factors`` (default {2, 4}) drawn from
    step_rng (factors that would leave the latent empty are skipped). One encode serves both terms.
    Downsampling is bilinear (align_corners=False, no antialias) on latent and image alike; the KL enters once,
    with the full-resolution term. The additive form and se_weight = 0.25 are our reading of FT-SE
    (not checked against its code).
    """

    kind = "scale"

    def __init__(self, *, se_weight: float = 0.25, factors: tuple[int, ...] = (2, 4), **recon_kwargs) -> None:
        super().__init__(**recon_kwargs)
        if se_weight < 0:
            raise ValueError(f"FT-SE weight must be >= 0, got {se_weight}")
        if not factors or any(int(f) < 1 for f in factors):
            raise UserValueError(f"FT-SE downsampling factors must be integers >= 1, got {factors}")
        self.se_weight = se_weight
        self.factors = tuple(int(f) for f in factors)

    @staticmethod
    def downsample_pair(z: torch.Tensor, x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear ×factor downsampling of z (B, C, h, w) to (h//f, w//f) and x to f_img times that."""
        h, w = z.shape[-2:]
        fy, fx = x.shape[-2] // h, x.shape[-1] // w
        hs, ws = h // factor, w // factor
        zd = F.interpolate(z, size=(hs, ws), mode="bilinear", align_corners=False)
        xd = F.interpolate(x, size=(hs * fy, ws * fx), mode="bilinear", align_corners=False)
        return zd, xd

    def loss(self, tokenizer, x: torch.Tensor, *, step_rng: torch.Generator | None = None,
             target_encoder: TargetEncoder | None = None) -> dict[str, torch.Tensor]:
        """Keys: loss, recon, mae, lpips, kl, se, se_factor."""
        posterior = tokenizer.encode(x)
        z = _decode_latent(tokenizer, posterior)
        full = self._recon(x, tokenizer.decode(z), posterior)
        usable = tuple(f for f in self.factors if z.shape[-2] // f >= 1 and z.shape[-1] // f >= 1)
        if not usable:
            raise UserValueError(
                f"FT-SE: latent {tuple(z.shape[-2:])} is too small for downsampling factors {self.factors}"
            )
        factor = _choice(usable, step_rng)
        z_d, x_d = self.downsample_pair(z, x, factor)
        se = self._recon(x_d, tokenizer.decode(z_d), posterior=None)["loss"]
        return {"loss": full["loss"] + self.se_weight * se, "recon": full["loss"], "mae": full["mae"],
                "lpips": full["lpips"], "kl": full["kl"], "se": se,
                "se_factor": torch.tensor(float(factor), device=x.device)}


# ----------------------------------------------------------------------------------------------- factory


def build_regularizer(
    kind: str,
    *,
    latent_channels: int,
    basis: str = "fourier",
    grid: str | tuple[int, int] | None = None,
    orthonormal: bool = False,
    alpha: float = 0.25,
    lambda_latent: float = 0.25,
    lambda_image: float = 1.0,
    lambda_mae_ssr: float = 1.0,
    lambda_lpips_ssr: float = 0.1,
    discretization: str = "zoh",
    delta_init: float = 0.1,
    delta_source: str = "fixed",
    a_normalization: str = "max",
    image_size: int | None = None,
    seed: int = 0,
    learn_a: bool = True,
    learn_delta: bool | None = None,
    mean_centering: bool = True,
    latent_loss: str = "centred",
    latent_space: str = "scaled",
    tau_max: float = 10.0,
    delta_tau: float = 4.0,
    lambda_mae: float = 1.0,
    lambda_lpips: float = 0.1,
    kl_weight: float = 1e-6,
    lpips_fn: LpipsFn | None = None,
    eq_probability: float = 0.5,
    se_weight: float = 0.25,
    se_factors: tuple[int, ...] = (2, 4),
) -> Regularizer:
    """The regularizer of ``kind`` ∈ {ssr, eq_vae, scale, none} (recipe section ``[regularizer]``).

    lambda_mae / lambda_lpips / kl_weight: the reconstruction loss (``[loss]``), used by every kind.
    SSR only: the dynamics (:func:`build_dynamics`: basis, grid — W·H must equal latent_channels, else
    ValueError naming ``regularizer.grid`` —, a_normalization, delta_source with delta_init or the blur gap
    delta_tau at image_size, discretization, learn_a — learn_delta follows it unless given —, seed for the random
    A), alpha, the λ's of eq. 23, mean_centering, latent_loss (:func:`latent_mse`), latent_space, tau_max,
    delta_tau. EQ-VAE: eq_probability.
    FT-SE: se_weight, se_factors.
    """
    recon = dict(lambda_mae=lambda_mae, lambda_lpips=lambda_lpips, kl_weight=kl_weight, lpips_fn=lpips_fn)
    if kind == "none":
        return NoneRegularizer(**recon)
    if kind == "eq_vae":
        return EQVAERegularizer(p_equivariance=eq_probability, **recon)
    if kind == "scale":
        return ScaleRegularizer(se_weight=se_weight, factors=se_factors, **recon)
    if kind == "ssr":
        dynamics = build_dynamics(basis, latent_channels, grid=grid, orthonormal=orthonormal,
                                  a_normalization=a_normalization, delta_source=delta_source, delta_init=delta_init,
                                  delta_tau=delta_tau, image_size=image_size, discretization=discretization,
                                  learn_a=learn_a, learn_delta=learn_delta, seed=seed)
        return SSRRegularizer(dynamics, alpha=alpha, lambda_latent=lambda_latent, lambda_image=lambda_image,
                              lambda_mae_ssr=lambda_mae_ssr, lambda_lpips_ssr=lambda_lpips_ssr,
                              mean_centering=mean_centering, latent_loss=latent_loss, latent_space=latent_space,
                              tau_max=tau_max, delta_tau=delta_tau, **recon)
    raise UserValueError(f"regularizer.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def build(r: RegularizerConfig, loss: LossConfig, *, latent_channels: int, image_size: int | None, seed: int,
          kind: str | None = None, lpips_fn: LpipsFn | None = None) -> Regularizer:
    """The regularizer of the recipe's ``[regularizer]`` (``kind`` overrides ``r.kind``, e.g. "none" for the
    pretraining stage) with the reconstruction loss of its ``[loss]``: :func:`build_regularizer` with every
    field taken from the two sections. ``image_size`` (data.image_size) sets the blur-gap Δ; ``seed`` (run.seed)
    the random A."""
    return build_regularizer(
        r.kind if kind is None else kind,
        latent_channels=latent_channels,
        basis=r.basis,
        grid=r.grid,
        orthonormal=r.orthonormal,
        alpha=r.alpha,
        lambda_latent=r.lambda_latent,
        lambda_image=r.lambda_image,
        lambda_mae_ssr=r.lambda_pred_mae,
        lambda_lpips_ssr=r.lambda_pred_lpips,
        discretization=r.discretization,
        delta_init=r.delta_init,
        delta_source=r.delta_source,
        a_normalization=r.a_normalization,
        image_size=image_size,
        seed=seed,
        learn_a=r.learn_a,
        mean_centering=r.mean_centering,
        latent_loss=r.latent_loss,
        latent_space=r.latent_space,
        tau_max=r.tau_max,
        delta_tau=r.delta_tau,
        eq_probability=r.eq_probability,
        se_weight=r.se_weight,
        se_factors=tuple(r.se_factors),
        lambda_mae=loss.lambda_mae,
        lambda_lpips=loss.lambda_lpips,
        kl_weight=loss.kl_weight,
        lpips_fn=lpips_fn,
    )
