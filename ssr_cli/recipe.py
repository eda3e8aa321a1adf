"""The TOML recipe: one pydantic model per concern, validated once at load.

``load(path, overrides)`` reads a TOML file, applies ``--set section.key=value`` overrides, validates
everything (unknown keys, wrong types, cross-field conflicts) and returns a :class:`Recipe`. Every
error names the TOML key and the file. ``dump(recipe)`` gives the resolved TOML text that is written
into the run folder and into every checkpoint.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ssr_cli.engine.atomic import write_text_atomic
from ssr_cli.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe problem; the message names the file and the TOML key."""


class Section(BaseModel):
    # use_attribute_docstrings: the string under each field becomes its description (tests/test_recipe.py checks it).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(Section):
    name: str = "run"
    """Run folder name: every output goes to <out_dir>/<name>."""
    out_dir: str = "runs"
    """Parent folder of the run folders."""
    seed: int = 0
    """Root of the run's random draws (initialisation, batch order, augmentation, blur levels, posterior
    samples, KID subsets), derived per (seed, stage, rank, step); sampling noise uses sample.seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto": CUDA when available, else CPU; "cuda" fails without a GPU (torchrun ranks use cuda:LOCAL_RANK)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    """torch.compile the model of each training loop (CUDA only; ignored on CPU)."""
    threads: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    """CPU threads for torch's intra-op work. 0 (default): one per core of this process's CPU set (divided among
    the torchrun ranks of one host), so a rerun or a resume uses the same count and gives bit-identical results.
    "auto": the cores idle when the run starts (sampled from /proc/stat over 0.2 s; at least 1), for machines
    shared with other jobs, where two 2-thread jobs on 2 cores each run several times slower than two 1-thread
    jobs; results then depend on the count picked (float reductions split differently). N: exactly N."""


class DataConfig(Section):
    source: Literal["builtin", "folder", "tar", "webdataset"] = "builtin"
    """Where images come from: "builtin" (random crops of the photographs bundled with scikit-image,
    class = photograph), an image "folder", a "tar" file or "webdataset" shards (see path)."""
    path: str | None = None
    """Image folder (class = sub-folder), tar file (members split/class/file) or, for webdataset, a .tar shard, a
    folder of them or a brace pattern (shards-{000000..000009}.tar); unused for builtin."""
    split: str | None = None
    """For tar sources: the member prefix to read (e.g. "train"); None reads all members."""
    image_size: int = Field(64, ge=8)
    """Side of the square crops, pixels: the training resolution (the blur τ, px², is measured at it)."""
    resize: bool = True
    """Resize the short side to image_size before cropping (off: crop directly, e.g. random patches)."""
    random_crop: bool = False
    """Random instead of center crops when training (builtin always crops at random)."""
    random_flip: bool = True
    """Horizontal flip with probability ½ when training (the stages that only read images never augment)."""
    max_images: int | None = Field(None, ge=1)
    """Use only this many images, spread evenly over the (sorted) set so every class stays; None: all."""
    builtin_crops: int = Field(256, ge=1)
    """Number of random crops drawn from the built-in photographs (the built-in dataset's length)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes for the training batches; 0 loads them in the main process."""
    max_unreadable_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Stop (exit 2) once more than this fraction of the images proved unreadable; listed in <run>/unreadable_images.txt."""

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source in ("folder", "tar", "webdataset") and not self.path:
            raise ValueError(f"data.path must be set when data.source = '{self.source}'")
        if self.source == "webdataset" and self.split is not None:
            raise ValueError("data.split applies to data.source = 'tar'; webdataset shards have no split prefix, "
                             "so point data.path at the split's shards (e.g. train-{000000..000009}.tar)")
        return self


class TokenizerConfig(Section):
    family: Literal["kl-ae", "cosmos-ci", "taesd", "s4d-vae", "cnn-vae"] = "kl-ae"
    """Architecture: "kl-ae" (Flux/SD-style KL autoencoder), "cosmos-ci" (Cosmos CI), "taesd", or the
    vector-latent VAEs trained from scratch, "s4d-vae" / "cnn-vae" (blog 002)."""
    size: str = "tiny"
    """A named size of the family (kl-ae: flux, sd, tiny, …; cosmos-ci: ci16x16, ci8x8, tiny; taesd: taesd,
    taef1, taef2); kl-ae "diffusers" takes the architecture from the config.json of the weights folder."""
    weights: str | None = None
    """Pretrained weights, a local file: .safetensors, .pt/.pth or TorchScript .jit. None: random init."""
    strict: bool = True
    """Fail on any missing, unexpected or mis-shaped tensor when loading weights; false loads only the
    tensors whose names and shapes match and warns about the rest."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Architecture overrides passed to the builder (e.g. z_channels, ch, ch_mult)."""
    frozen_encoder_blocks: int = Field(2, ge=0)
    """Encoder stages frozen while fine-tuning, the first ones executed (paper: 2); pretraining trains all."""
    frozen_decoder_blocks: int = Field(2, ge=0)
    """Decoder stages frozen while fine-tuning, the last ones executed (paper: 2); pretraining trains all."""
    grad_checkpointing: bool = False
    """Activation checkpointing in the encoder and decoder (less memory, more compute); kl-ae and cosmos-ci only."""


class RegularizerConfig(Section):
    kind: Literal["ssr", "eq_vae", "scale", "none"] = "ssr"
    """Fine-tuning objective: "ssr" (this method), "eq_vae" (EQ-VAE), "scale" (FT-SE) or "none"
    (reconstruction only). The vector-latent VAEs need "none"; denoise takes "ssr" or "none"."""
    basis: Literal["fourier", "chebyshev", "legendre", "hermite", "random"] = "fourier"
    """The basis behind A; "random": a dense seeded random A = −M·Mᵀ normalised to max|A| = 1 (seed from run.seed;
    the random-A ablation of the paper's Table 4)."""
    grid: str | None = None
    """W×H basis grid, e.g. "4x4"; must satisfy W·H = latent channels. None: most square factorisation. The grid
    only indexes the basis functions: their domain has the image's aspect ratio (square training crops: square)."""
    orthonormal: bool = False
    """A for the normalised basis φ_n/‖φ_n‖ (the exact generator of orthonormal coefficients); off: the
    paper-literal A of eq. 40 (method.md §1)."""
    alpha: float = Field(0.25, ge=0.0, le=1.0)
    """Probability of the regularization branch at each step."""
    lambda_latent: float = Field(0.25, ge=0.0)
    """λ_z: weight of the latent MSE between z2 and ẑ2 (eq. 23; the paper: 0.25 for Flux, 5.0 for Cosmos)."""
    lambda_image: float = Field(1.0, ge=0.0)
    """λ_I: weight of the decoded prediction's term, lambda_pred_mae·MAE + lambda_pred_lpips·LPIPS (paper: 1)."""
    lambda_pred_mae: float = Field(1.0, ge=0.0)
    """Weight of the MAE between the decoded SSR prediction D(ẑ2) and blur(x, τ2) (inside λ_I's term)."""
    lambda_pred_lpips: float = Field(0.1, ge=0.0)
    """Weight of the LPIPS between D(ẑ2) and blur(x, τ2); [loss].lambda_lpips weighs the reconstruction's."""
    discretization: Literal["euler", "zoh", "auto"] = "zoh"
    """Ā = exp(ΔA) ("zoh", exact for any A), I + ΔA ("euler", first order); "auto" picks ZOH for every basis."""
    delta_init: float = Field(0.1, gt=0.0)
    """Δ when delta_source = "fixed" (Table 3: 0.1 for the max-normalised A)."""
    delta_source: Literal["fixed", "blur_gap"] = "fixed"
    """"fixed": Δ = delta_init (Table 3). "blur_gap": the Δ that makes Ā the exact coefficient dynamics of a blur
    of delta_tau px² at data.image_size (§4.2–4.3; 0.0217 for the 4×4 Fourier A at 256²)."""
    a_normalization: Literal["max", "none"] = "max"
    """"max": A / max|A| (max|A| = 1, Table 3); "none": the raw generator (time = blur variance in domain units²)."""
    learn_a: bool = True
    """Train A's structurally nonzero entries and Δ; off: both stay at their initial values."""
    a_lr_mult: float = Field(0.1, ge=0.0)
    """Learning rate of A and Δ as a multiple of the base LR, without weight decay (paper: 0.1)."""
    mean_centering: bool = True
    """Predict ẑ2 = mean(z1) + Ā·C(z1) (paper eq. 24; C = minus the spatial mean per channel); off: ẑ2 = Ā·z1."""
    latent_loss: Literal["centred", "carried_mean"] = "centred"
    """With mean_centering: "centred" = MSE(C(z2), Ā·C(z1)), eq. 24 read literally (default; channel means may move
    under blur, as in the paper's Fig. 5); "carried_mean" = MSE(z2, mean(z1) + Ā·C(z1)), which adds a penalty on
    the channel means moving (the behaviour before 0.2). The decoder sees mean(z1) + Ā·C(z1) in both."""
    latent_space: Literal["scaled", "raw"] = "scaled"
    """Latent the SSR term reads for tokenizers with a scale/shift (Flux, SD): "scaled" = scale·(μ − shift), the
    latent the generator sees (default); "raw" = the posterior mean μ itself. Same for scale 1, shift 0."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """Decay of the EMA copy of the encoder that gives the target z2 = E_ema(I_τ2) (appendix A.5: 0.999)."""
    tau_max: float = Field(10.0, gt=0.0)
    """Largest blur variance, pixels² at the training resolution."""
    delta_tau: float = Field(4.0, gt=0.0)
    """Gap between the two blur variances of a pair."""
    eq_probability: float = Field(0.5, ge=0.0, le=1.0)
    """EQ-VAE: probability of the scale+rotation branch."""
    se_weight: float = Field(0.25, ge=0.0)
    """FT-SE: weight of the downsampled-pair reconstruction term added at every step."""
    se_factors: list[int] = Field(default_factory=lambda: [2, 4])
    """FT-SE: downsampling factors, one drawn per step."""

    @model_validator(mode="after")
    def _tau_range(self) -> "RegularizerConfig":
        if self.delta_tau >= self.tau_max:
            raise ValueError(
                f"regularizer.delta_tau ({self.delta_tau}) must be smaller than regularizer.tau_max ({self.tau_max})"
            )
        return self

    @model_validator(mode="after")
    def _dynamics_readings(self) -> "RegularizerConfig":
        if self.basis == "random" and (self.delta_source != "fixed" or self.a_normalization != "max"):
            raise ValueError("regularizer.basis = 'random' has no physical time or scale: it needs "
                             "regularizer.delta_source = 'fixed' and regularizer.a_normalization = 'max'")
        if self.delta_source == "blur_gap" and self.basis != "fourier" and not self.orthonormal:
            raise ValueError(f"regularizer.delta_source = 'blur_gap' with basis '{self.basis}' needs "
                             "regularizer.orthonormal = true (the paper-literal polynomial A is not the generator of "
                             "any coefficients, so no Δ makes Ā the blur's dynamics)")
        return self


class LossConfig(Section):
    lambda_mae: float = Field(1.0, ge=0.0)
    """Weight of the reconstruction MAE (mean over pixel elements of images in [-1, 1]; paper: 1)."""
    lambda_lpips: float = Field(0.1, ge=0.0)
    """Weight of the reconstruction LPIPS (paper: 0.1), also in the EQ-VAE / FT-SE terms; > 0 needs
    lpips_weights."""
    lpips_net: Literal["alex", "vgg"] = "alex"
    """Backbone of the training LPIPS: AlexNet ("alex") or VGG16 ("vgg"); lpips_weights must match it."""
    lpips_weights: str | None = None
    """Local backbone weights for LPIPS (e.g. ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth)."""
    kl_weight: float = Field(1e-6, ge=0.0)
    """Weight of KL(q‖N(0, I)) (nats per image) for KL tokenizers, entering as kl_weight·KL/(3·H·W): LDM's
    convention (Flux: 1e-6). Deterministic autoencoders (Cosmos CI, TAESD) have no KL term."""


class OptimConfig(Section):
    """What ``[train]`` and ``[dit]`` share: AdamW, gradient clipping, checkpoints, logging and the non-finite
    guard (:func:`ssr_cli.stages.common.optimisation` hands them to the engine). The defaults here are
    ``[train]``'s; ``[dit]`` sets its own (LightningDiT's)."""

    steps: int = Field(1000, ge=0)
    """Optimiser steps, each on batch_size images or latents."""
    batch_size: int = Field(32, ge=1)
    """Global batch size (summed over ranks and accumulation steps)."""
    lr: float = Field(1e-5, gt=0.0)
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (β1, β2)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW's decoupled weight decay (the DiT's norms, biases and embeddings get none)."""
    grad_clip: float = Field(50.0, ge=0.0)
    """Clip the gradient's global 2-norm to this value; 0 turns clipping off."""
    ckpt_every_steps: int = Field(500, ge=1)
    """Steps between checkpoints (one is also written at the last step)."""
    keep_last: int = Field(3, ge=1)
    """Newest checkpoints kept; older ones are deleted."""
    log_every_steps: int = Field(10, ge=1)
    """Steps between metrics.jsonl records."""
    max_nonfinite_steps: int = Field(20, ge=1)
    """Consecutive steps with a non-finite loss or gradient (each skipped: no optimizer or EMA update) that stop the run."""


class TrainConfig(OptimConfig):
    """Optimisation of the tokenizer (``finetune``); the engine's knobs."""

    steps: int = Field(1000, ge=0)
    """Fine-tuning steps; 0 (with pretrain_steps > 0) only pretrains: the exported tokenizer is the pretrained one."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step; batch_size must be divisible by ranks × grad_accum."""
    lr_init: float = Field(1e-7, ge=0.0)
    """Learning rate at the start of the linear warm-up (Table 2: 1e-7)."""
    lr_min: float = Field(1e-6, ge=0.0)
    """Learning rate at the end of the cosine decay, at most lr (Table 2: 1e-6 for Flux, 1e-5 for Cosmos)."""
    schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    """"warmup_cosine": linear warm-up from lr_init to lr, hold, cosine to lr_min (Table 2); "constant": lr
    throughout."""
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0)
    """Fraction of the run, at its start, of the linear warm-up (Table 2: 1/10); warmup_frac + cosine_frac ≤ 1."""
    cosine_frac: float = Field(0.5, ge=0.0, le=1.0)
    """Fraction of the run, at its end, over which the LR decays by a cosine to lr_min."""
    image_every_steps: int = Field(200, ge=1)
    """Steps between the progress image grids written to the stage's images/ folder."""
    pretrain_steps: int = Field(0, ge=0)
    """Steps of plain reconstruction training from scratch before fine-tuning (quickstart: no pretrained weights)."""
    pretrain_lr: float = Field(1e-3, gt=0.0)
    """Constant learning rate of the from-scratch pretraining stage."""

    @model_validator(mode="after")
    def _fractions(self) -> "TrainConfig":
        if self.warmup_frac + self.cosine_frac > 1.0:
            raise ValueError(
                f"train.warmup_frac + train.cosine_frac = {self.warmup_frac + self.cosine_frac} exceeds 1"
            )
        if self.lr_min > self.lr:
            raise ValueError(f"train.lr_min ({self.lr_min}) exceeds train.lr ({self.lr})")
        if self.steps == 0 and self.pretrain_steps == 0:
            raise ValueError("train.steps = 0 and train.pretrain_steps = 0: nothing to train (set one of them > 0)")
        return self


class LatentsConfig(Section):
    out_dir: str | None = None
    """Where shards go; default <run folder>/latents."""
    shard_size: int = Field(1024, ge=1)
    """Images per safetensors shard (a finished shard is kept when encoding resumes)."""
    sample_posterior: bool = True
    """Cache one posterior sample per image (seeded by the image; LightningDiT) instead of the posterior
    mean; tokenizers without a posterior store their latent."""
    flip: bool = True
    """Also cache the latent of each image's horizontal flip (LightningDiT); the DiT reads either copy at random."""
    stats_count: int = Field(10000, ge=1)
    """Latents (class-stratified, seeded) behind the per-channel mean/std that normalise the DiT's input
    (LightningDiT: 10K)."""
    batch_size: int = Field(64, ge=1)
    """Encoding batch size, images."""


class DiTConfig(OptimConfig):
    model: str = "DiT-B/2"
    """DiT size (DiT-S/B/L/XL with patch 1 or 2: ssr_cli.models.dit.DIT_SIZES); the paper trains LightningDiT-B/2."""
    depth: int | None = Field(None, ge=1)
    """Transformer blocks; None: the model's (B: 12)."""
    hidden_size: int | None = Field(None, ge=8)
    """Token width; None: the model's (B: 768)."""
    num_heads: int | None = Field(None, ge=1)
    """Attention heads; None: the model's (B: 12)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys (optional in LightningDiT, off in its B/2)."""
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a training label becomes the null class, the unconditional branch of CFG (LightningDiT: 0.1)."""
    num_classes: int | None = Field(None, ge=1)
    """None: taken from the dataset."""
    time_scale: float = Field(1000.0, gt=0.0)
    """The timestep sinusoid sees time_scale·t; 1 is LightningDiT's convention (needed to export to its layout)."""
    steps: int = Field(80000, ge=1)
    """DiT training steps (the paper: 80K)."""
    batch_size: int = Field(1024, ge=1)
    """Global batch size, latents, divisible by the number of ranks (LightningDiT: 1024)."""
    lr: float = Field(2e-4, gt=0.0)
    """AdamW learning rate, constant (LightningDiT: 2e-4)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (β1, β2) (LightningDiT: (0.9, 0.95))."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the gradient's global 2-norm to this value (LightningDiT: 1.0); 0 turns clipping off."""
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    """Decay of the DiT's EMA weights, the ones sampled from (LightningDiT: 0.9999)."""
    cosine_loss: bool = True
    """Add mean(1 − cos(v̂, v)) over channels to the velocity MSE (LightningDiT's loss); off: MSE only."""
    t_mean: float = 0.0
    """Location of the logit-normal training time t = sigmoid(t_mean + t_std·ε), ε ~ N(0, 1) (t = 1: data)."""
    t_std: float = Field(1.0, gt=0.0)
    """Scale of the logit-normal training time (see t_mean)."""
    ckpt_every_steps: int = Field(5000, ge=1)
    """Steps between DiT checkpoints (one is also written at the last step)."""
    log_every_steps: int = Field(50, ge=1)
    """Steps between metrics.jsonl records."""


class SampleConfig(Section):
    sampler: Literal["euler", "heun"] = "euler"
    """ODE integrator from noise to data: "euler" (one evaluation per step; LightningDiT) or "heun" (two)."""
    steps: int = Field(250, ge=1)
    """Integration steps from t = 0 (noise) to t = 1 (data) (LightningDiT: 250)."""
    shift: float = Field(0.3, gt=0.0)
    """Timestep shift s of the time grid, t' = s·t/(1 + (s − 1)·t); 1: uniform (LightningDiT: 0.3)."""
    cfg_scale: float = Field(1.0, ge=0.0)
    """Classifier-free guidance scale; 1 (default): no guidance, one conditional forward (the paper's protocol)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Times (lo, hi), 0 ≤ lo ≤ hi ≤ 1, where guidance applies; elsewhere the conditional velocity is used."""
    num_images: int = Field(50000, ge=1)
    """Samples to generate (ADM protocol: 50K)."""
    batch_size: int = Field(64, ge=1)
    """Sampling batch size, images; the samples do not depend on it (noise is seeded per image)."""
    labels: Literal["uniform", "balanced"] = "balanced"
    """Class of each sample: "balanced" (index mod K: 50 per class at 50K/1000) or "uniform" (drawn at random,
    seeded, as ADM, DiT and LightningDiT do). Recorded in samples.json and eval.json."""
    quantize: Literal["round", "truncate"] = "round"
    """[-1, 1] -> uint8 of the saved samples: "round" (ours, round((x+1)*127.5)) or "truncate" (ADM's sampler,
    floor((x+1)*127.5), about half a grey level darker)."""
    seed: int = 0
    """Seed of each image's initial noise and of "uniform" labels, per image index; independent of run.seed."""
    use_ema: bool = True
    """Sample with the DiT's EMA weights (dit_ema.safetensors); off: the raw weights of its newest checkpoint."""
    out_dir: str | None = None
    """Where samples go (png/ and samples.npz); None: <run folder>/samples."""

    @model_validator(mode="after")
    def _interval(self) -> "SampleConfig":
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"sample.cfg_interval must satisfy 0 <= lo <= hi <= 1, got {list(self.cfg_interval)}")
        return self


class EvalConfig(Section):
    inception_weights: str | None = None
    """TF-Inception weights (../shared/data/inception/pt_inception-2015-12-05-reconstructed-nofc.pth)."""
    lpips_weights: str | None = None
    """Local LPIPS backbone weights for the reconstruction metric (e.g.
    ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth); None: LPIPS is reported unavailable."""
    lpips_net: Literal["alex", "vgg"] = "alex"
    """Backbone of the LPIPS metric: AlexNet ("alex") or VGG16 ("vgg"); lpips_weights must match it."""
    image_size: int | None = Field(None, ge=8)
    """Reconstruction resolution (resize + center crop); None: data.image_size."""
    num_images: int | None = Field(None, ge=1)
    """Images used for reconstruction metrics (None: all)."""
    images: str | None = None
    """Reconstruction image set (folder or .tar, e.g. ImageNet val); None: the recipe's [data]."""
    images_split: str | None = None
    """For a .tar eval.images: the member prefix to read (as data.split); None reads all members."""
    batch_size: int = Field(32, ge=1)
    """Batch size, images, of reconstruction and of Inception feature extraction."""
    num_reference_images: int | None = Field(None, ge=2)
    """Images read from a folder/tar/[data] reference (None: all), chosen by eval.subset."""
    subset: Literal["stratified", "uniform", "first"] = "stratified"
    """How num_images / num_reference_images pick their images: "stratified" (seeded, every class keeps its
    share), "uniform" (seeded, uniformly at random) or "first" (sorted order: few classes of a sorted tar)."""
    subset_seed: int = 0
    """Seed of the "stratified" and "uniform" subsets; independent of run.seed, so runs see the same images."""
    reference: str | None = None
    """FID reference: image folder / tar, ADM .npz batch or stats file from --make-ref. None: the data set."""
    reference_split: str | None = None
    """For a .tar eval.reference: the member prefix to read (as data.split); None reads all members."""
    reconstruction: bool = True
    """Compute the reconstruction metrics (PSNR, SSIM, LPIPS, rFID, KL) on eval.images."""
    generation: bool = True
    """Compute the generation metrics of the run's samples (FID, sFID, IS, precision/recall, KID; needs
    inception_weights)."""
    kid_subsets: int = Field(10, ge=1)
    """KID: random subsets the unbiased MMD² is averaged over (torch-fidelity uses 100)."""
    kid_subset_size: int = Field(1000, ge=2)
    """KID: features per subset, drawn without replacement, capped at the smaller set (as torch-fidelity)."""


class ProbeConfig(Section):
    num_images: int = Field(4, ge=1)
    """Rows of the unmasking figure."""
    score_images: int = Field(64, ge=1)
    """Images behind the numbers (PSNR vs k, order scores) and the channel means used for masking."""
    image_size: int | None = Field(None, ge=8)
    """Side of the probe's images, pixels; None: data.image_size."""
    taus: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    """Blur variances, px² at the probe's resolution, of the latent-dynamics plot; the largest is also
    the τ of the per-channel blur-decay ratio."""
    channels_shown: int = Field(4, ge=1)
    """Channels, the first in frequency order, plotted in latent_dynamics.png."""
    fill: Literal["dataset_mean", "image_mean", "zero"] = "dataset_mean"
    """Value of a masked channel in the partial decodes: its mean over the score images and positions
    ("dataset_mean"), the image's own spatial mean of that channel ("image_mean"), or 0 ("zero")."""


class VAEConfig(Section):
    """From-scratch VAE training (S4D-VAE / CNN-VAE, blog 002)."""

    kl_schedule: Literal["none", "linear_warmup", "cyclical"] = "linear_warmup"
    """KL weight schedule against posterior collapse: "none" (kl_max_weight throughout), "linear_warmup"
    (Bowman et al. 2016) or "cyclical" (Fu et al. 2019)."""
    kl_warmup_steps: int = Field(500, ge=0)
    """Steps of the linear ramp from kl_start_weight to kl_max_weight (> 0 with "linear_warmup"); also
    the alarm's grace when collapse_grace_steps is None."""
    kl_max_weight: float = Field(1.0, ge=0.0)
    """KL weight β after the ramp (throughout with "none"); 1 minimises the plain NELBO."""
    collapse_threshold: float = Field(0.01, ge=0.0)
    """KL per latent dimension (nats) under which a dimension counts as collapsed."""
    collapse_patience: int = Field(100, ge=1)
    """Consecutive steps the collapse must last before the alarm fires."""
    num_prior_samples: int = Field(64, ge=1)
    """Prior samples in each PNG grid (8 per row)."""
    kl_start_weight: float = Field(0.0, ge=0.0)
    """KL weight at the start of a warm-up (or of each cycle)."""
    kl_cycle_steps: int = Field(1000, ge=1)
    """Cycle length of the 'cyclical' schedule."""
    kl_ramp_fraction: float = Field(0.5, gt=0.0, le=1.0)
    """Fraction of each cycle spent ramping the KL weight up ('cyclical')."""
    collapse_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of latent dims that must be collapsed for the alarm (1.0: all of them)."""
    collapse_grace_steps: int | None = Field(None, ge=0)
    """Steps not judged by the alarm (a fresh VAE starts with KL ≈ 0). None: kl_warmup_steps."""
    ssm_lr: float = Field(1e-3, gt=0.0)
    """Learning rate of the S4D state-space parameters (A, Δ; no weight decay), scaled by the same schedule."""
    grid_images: int = Field(8, ge=1)
    """Fixed images shown with their reconstructions in the PNG grids."""


class DenoiseConfig(Section):
    """Restoration task (blog 000): a small denoiser with or without SSR on its bottleneck."""

    noise_sigma: float = Field(25.0, gt=0.0)
    """Gaussian noise std on the 0-255 scale."""
    channels: int = Field(32, ge=4)
    """Width of the U-Net's first level (doubled at each level down)."""
    bottleneck_channels: int = Field(16, ge=1)
    """Channels of the bottleneck features SSR regularizes; must equal W·H of regularizer.grid."""
    eval_pairs: str | None = None
    """Folder with NOISY/ and GT/ sub-folders (e.g. ../shared/data/sidd_pairs)."""
    eval_crop: int = Field(256, ge=16)
    """Center crop (pixels) of the real pairs and of eval_images for evaluation (bounded CPU cost)."""
    depth: int = Field(2, ge=1)
    """U-Net levels (each halves the resolution); the bottleneck is at 1/2^depth."""
    blocks_per_level: int = Field(1, ge=1)
    """Residual blocks per U-Net level, on the way down and on the way up."""
    feature_norm: bool = True
    """GroupNorm(1) without affine on the bottleneck features (fixes their scale; SSR diverges without it)."""
    lambda_ssr: float = Field(0.1, ge=0.0)
    """Weight of the SSR latent term (in the reading regularizer.latent_loss) added, with probability
    regularizer.alpha, to the L1 loss."""
    normalize_latent: bool = False
    """Divide the SSR MSE by the mean square of the centred target features."""
    blur_source: Literal["noisy", "clean"] = "noisy"
    """Blur the noisy input (default) or blur the clean image and add the same noise."""
    ema_target: bool = False
    """Target features from an EMA copy (decay regularizer.ema_decay) instead of the network under no_grad."""
    compare: bool = False
    """Train both arms, baseline (no regularizer) and SSR, with the same seed; write a comparison table."""
    eval_images: str | None = None
    """Held-out clean images (folder or .tar) for the synthetic-noise evaluation; None: held-out crops of [data]."""
    eval_count: int = Field(16, ge=1)
    """Held-out images in the synthetic-noise evaluation."""


class DiffusabilityConfig(Section):
    """``ssr diffusability``: cheap proxies of how well a DiT can model the tokenizer's latents."""

    proxies: list[Literal["stats", "spectrum", "equivariance", "ifid", "viv", "flow_probe"]] = Field(
        default_factory=lambda: ["stats", "spectrum", "equivariance", "ifid", "viv", "flow_probe"])
    """Which proxies to compute (each is cached in <out>/parts/ and skipped when it is already done)."""
    num_images: int = Field(512, ge=4)
    """Images (spread over the data set) behind statistics, spectra, equivariance, iFID and the FID reference."""
    num_latents: int = Field(5000, ge=8)
    """Latents (posterior means, spread over the data set) the flow probe trains on and the VIV estimate reads."""
    holdout: int = Field(256, ge=2)
    """Of these, the last ones held out: the flow probe's test set and the VIV queries."""
    batch_size: int = Field(64, ge=1)
    """Encode / decode / sampling batch size."""
    spectrum: Literal["fft", "dct"] = "fft"
    """Transform of the radially averaged power spectrum (FFT: periodic; DCT-II orthonormal: reflective)."""
    down_factors: list[int] = Field(default_factory=lambda: [2, 4])
    """Equivariance: 2×2 / 4×4 average-pool downsampling factors (skipped where the latent is not divisible)."""
    ifid_weight: float = Field(0.5, ge=0.0, le=1.0)
    """iFID: z = (1 − w)·z_i + w·z_nn(i); w = 0 is the rFID of the same images."""
    t_grid: list[float] = Field(default_factory=lambda: [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    """Times (0 = noise, 1 = data) of the held-out flow loss and the velocity-variance estimate."""
    probe_model: str = "DiT-S/2"
    """DiT size name of the flow probe (as dit.model); only its patch size counts: probe_depth, probe_hidden
    and probe_heads set the rest."""
    probe_depth: int = Field(4, ge=1)
    """Transformer blocks of the flow probe."""
    probe_hidden: int = Field(128, ge=8)
    """Token width of the flow probe."""
    probe_heads: int = Field(4, ge=1)
    """Attention heads of the flow probe."""
    probe_steps: int = Field(2000, ge=1)
    """Fixed training budget of the flow probe (steps of probe_batch latents)."""
    probe_batch: int = Field(64, ge=1)
    """Latents per flow-probe training step."""
    probe_lr: float = Field(5e-4, gt=0.0)
    """Constant AdamW learning rate of the flow probe (betas (0.9, 0.95), gradient clip 1)."""
    probe_ckpt_every: int = Field(250, ge=1)
    """Checkpoint interval: an interrupted probe resumes from the last one."""
    probe_samples: int = Field(256, ge=0)
    """Probe samples for its FID against the num_images data images (needs eval.inception_weights; 0: none)."""
    sample_steps: int = Field(50, ge=1)
    """Euler steps of the probe's sampler."""
    latent_transform: Literal["none", "noise", "permute", "mix"] = "none"
    """Controlled degradation applied after the encoder (inverted before the decoder, except noise): additive
    Gaussian noise, a fixed permutation of latent positions, or a random orthogonal mixing of channels."""
    transform_strength: float = Field(0.0, ge=0.0)
    """noise: its std in units of each channel's std over the batch."""
    transform_seed: int = 0
    """Seed of latent_transform's noise, permutation or mixing matrix."""

    @model_validator(mode="after")
    def _sizes(self) -> "DiffusabilityConfig":
        if self.holdout >= self.num_latents:
            raise ValueError(f"diffusability.holdout ({self.holdout}) must be smaller than diffusability.num_latents "
                             f"({self.num_latents})")
        if not all(0.0 <= t < 1.0 for t in self.t_grid) or not self.t_grid:
            raise ValueError(f"diffusability.t_grid must be non-empty times in [0, 1), got {self.t_grid}")
        if any(f < 2 for f in self.down_factors):
            raise ValueError(f"diffusability.down_factors must be >= 2, got {self.down_factors}")
        return self


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    """[run]: run folder, seed, device, precision, threads."""
    data: DataConfig = Field(default_factory=DataConfig)
    """[data]: the image data set and its crops."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """[tokenizer]: the autoencoder, its weights and what is frozen."""
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)
    """[regularizer]: the fine-tuning objective (SSR and the baselines) and its dynamics."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """[loss]: the reconstruction loss every regularizer kind uses."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """[train]: optimisation of the tokenizer (finetune; also the VAE and denoiser stages)."""
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    """[latents]: the latent cache of encode-latents."""
    dit: DiTConfig = Field(default_factory=DiTConfig)
    """[dit]: the DiT of train-dit and its optimisation."""
    sample: SampleConfig = Field(default_factory=SampleConfig)
    """[sample]: generation with the trained DiT."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """[eval]: reconstruction and generation metrics."""
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    """[probe]: probe-channels figures and numbers."""
    vae: VAEConfig = Field(default_factory=VAEConfig)
    """[vae]: from-scratch VAE training (KL schedule, collapse alarm)."""
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    """[denoise]: the restoration task."""
    diffusability: DiffusabilityConfig = Field(default_factory=DiffusabilityConfig)
    """[diffusability]: the diffusability proxies."""

    @model_validator(mode="after")
    def _cross_section(self) -> "Recipe":
        if self.regularizer.kind == "ssr" and self.regularizer.grid is not None:
            try:
                w, h = _parse_grid(self.regularizer.grid)
            except ValueError as exc:
                raise ValueError(f"regularizer.grid: {exc}") from None
            del w, h
        if self.tokenizer.family in ("s4d-vae", "cnn-vae") and self.regularizer.kind != "none":
            raise ValueError(
                f"regularizer.kind = '{self.regularizer.kind}' needs a spatial latent; the {self.tokenizer.family} "
                "latent is a vector: set regularizer.kind = 'none'"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def _parse_grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected 'WxH' such as '4x4' or '8x4', got {text!r}")
    w, h = int(parts[0]), int(parts[1])
    if w < 1 or h < 1:
        raise ValueError(f"grid sides must be >= 1, got {text!r}")
    return w, h


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as a TOML value, else as a string)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise RecipeError(f"--set {text!r}: the key must name a section and a key, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _apply_override(data: dict, path: list[str], value: Any, source: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: --set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (the recipe's sections at the top level)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


RENAMED_KEYS = {
    "regularizer.lambda_mae": "regularizer.lambda_pred_mae (the MAE weight of the decoded SSR prediction)",
    "regularizer.lambda_lpips": "regularizer.lambda_pred_lpips (the LPIPS weight of the decoded SSR prediction)",
}
"""Keys that were renamed: an old key fails with the new name instead of "unknown key"."""


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and key in RENAMED_KEYS:
            msg = f"renamed to {RENAMED_KEYS[key]}"
        elif err["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in err["loc"][:-1]) or "top level"
            msg = f"unknown key (not a field of [{section}])"
            known = _fields_at(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"  {key or '(recipe)'}: {msg}")
    return f"invalid recipe {source}:\n" + "\n".join(lines)


def from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate strictly, as JSON values: no coercion (``run.seed = true`` or ``steps = "150"`` is an error; an
    integer is still a valid float and an array a valid pair)."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):  # values TOML cannot hold (a caller's Path, …): the lenient check
        text = None
    try:
        return Recipe.model_validate(data) if text is None else Recipe.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source)) from None


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a TOML recipe (None: all defaults), applying ``section.key=value`` overrides."""
    if path is None:
        data: dict = {}
        source = "<defaults>"
    else:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        key_path, value = parse_override(item)
        _apply_override(data, key_path, value, source)
    return from_dict(data, source)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as TOML text, written by tomli-w (None values are omitted: they are the defaults);
    ``tomllib.loads(dump(r))`` validates back to ``r``."""
    return tomli_w.dumps({section: {key: value for key, value in values.items() if value is not None}
                          for section, values in recipe.model_dump().items()})


def write_resolved(recipe: Recipe, run_dir: Path) -> Path:
    return write_text_atomic(run_dir / "recipe.resolved.toml", dump(recipe))
