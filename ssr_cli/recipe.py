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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    threads: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    """CPU threads for torch's intra-op work. 0 (default): one per core of this process's CPU set (divided among
    the torchrun ranks of one host), so a rerun or a resume uses the same count and gives bit-identical results.
    "auto": the cores idle when the run starts (sampled from /proc/stat over 0.2 s; at least 1), for machines
    shared with other jobs, where two 2-thread jobs on 2 cores each run several times slower than two 1-thread
    jobs; results then depend on the count picked (float reductions split differently). N: exactly N."""


class DataConfig(Section):
    source: Literal["builtin", "folder", "tar", "webdataset"] = "builtin"
    path: str | None = None
    """Image folder (class = sub-folder), tar file (members split/class/file) or, for webdataset, a .tar shard, a
    folder of them or a brace pattern (shards-{000000..000009}.tar); unused for builtin."""
    split: str | None = None
    """For tar sources: the member prefix to read (e.g. "train"); None reads all members."""
    image_size: int = Field(64, ge=8)
    resize: bool = True
    """Resize the short side to image_size before cropping (off: crop directly, e.g. random patches)."""
    random_crop: bool = False
    random_flip: bool = True
    max_images: int | None = Field(None, ge=1)
    builtin_crops: int = Field(256, ge=1)
    """Number of random crops drawn from the built-in photographs (the built-in dataset's length)."""
    num_workers: int = Field(0, ge=0)
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
    size: str = "tiny"
    weights: str | None = None
    """Pretrained weights, a local file: .safetensors, .pt/.pth or TorchScript .jit. None: random init."""
    strict: bool = True
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Architecture overrides passed to the builder (e.g. z_channels, ch, ch_mult)."""
    frozen_encoder_blocks: int = Field(2, ge=0)
    frozen_decoder_blocks: int = Field(2, ge=0)
    grad_checkpointing: bool = False


class RegularizerConfig(Section):
    kind: Literal["ssr", "eq_vae", "scale", "none"] = "ssr"
    basis: Literal["fourier", "chebyshev", "legendre", "hermite", "random"] = "fourier"
    """The basis behind A; "random": a dense seeded random A = −M·Mᵀ normalised to max|A| = 1 (seed from run.seed;
    the random-A ablation of the paper's Table 4)."""
    grid: str | None = None
    """W×H basis grid, e.g. "4x4"; must satisfy W·H = latent channels. None: most square factorisation. The grid
    only indexes the basis functions: their domain has the image's aspect ratio (square training crops: square)."""
    orthonormal: bool = False
    alpha: float = Field(0.25, ge=0.0, le=1.0)
    """Probability of the regularization branch at each step."""
    lambda_latent: float = Field(0.25, ge=0.0)
    lambda_image: float = Field(1.0, ge=0.0)
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
    a_lr_mult: float = Field(0.1, ge=0.0)
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
    lambda_lpips: float = Field(0.1, ge=0.0)
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_weights: str | None = None
    """Local backbone weights for LPIPS (e.g. ../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth)."""
    kl_weight: float = Field(1e-6, ge=0.0)


class OptimConfig(Section):
    """What ``[train]`` and ``[dit]`` share: AdamW, gradient clipping, checkpoints, logging and the non-finite
    guard (:func:`ssr_cli.stages.common.optimisation` hands them to the engine). The defaults here are
    ``[train]``'s; ``[dit]`` sets its own (LightningDiT's)."""

    steps: int = Field(1000, ge=0)
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
    lr_init: float = Field(1e-7, ge=0.0)
    lr_min: float = Field(1e-6, ge=0.0)
    schedule: Literal["warmup_cosine", "constant"] = "warmup_cosine"
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0)
    cosine_frac: float = Field(0.5, ge=0.0, le=1.0)
    """Fraction of the run, at its end, over which the LR decays by a cosine to lr_min."""
    image_every_steps: int = Field(200, ge=1)
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
    sample_posterior: bool = True
    flip: bool = True
    stats_count: int = Field(10000, ge=1)
    batch_size: int = Field(64, ge=1)


class DiTConfig(OptimConfig):
    model: str = "DiT-B/2"
    depth: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=8)
    num_heads: int | None = Field(None, ge=1)
    qk_norm: bool = False
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    num_classes: int | None = Field(None, ge=1)
    """None: taken from the dataset."""
    time_scale: float = Field(1000.0, gt=0.0)
    """The timestep sinusoid sees time_scale·t; 1 is LightningDiT's convention (needed to export to its layout)."""
    steps: int = Field(80000, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    cosine_loss: bool = True
    t_mean: float = 0.0
    t_std: float = Field(1.0, gt=0.0)
    ckpt_every_steps: int = Field(5000, ge=1)
    log_every_steps: int = Field(50, ge=1)


class SampleConfig(Section):
    sampler: Literal["euler", "heun"] = "euler"
    steps: int = Field(250, ge=1)
    shift: float = Field(0.3, gt=0.0)
    cfg_scale: float = Field(1.0, ge=0.0)
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    num_images: int = Field(50000, ge=1)
    batch_size: int = Field(64, ge=1)
    labels: Literal["uniform", "balanced"] = "balanced"
    """Class of each sample: "balanced" (index mod K: 50 per class at 50K/1000) or "uniform" (drawn at random,
    seeded, as ADM, DiT and LightningDiT do). Recorded in samples.json and eval.json."""
    quantize: Literal["round", "truncate"] = "round"
    """[-1, 1] -> uint8 of the saved samples: "round" (ours, round((x+1)*127.5)) or "truncate" (ADM's sampler,
    floor((x+1)*127.5), about half a grey level darker)."""
    seed: int = 0
    use_ema: bool = True
    out_dir: str | None = None

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
    lpips_net: Literal["alex", "vgg"] = "alex"
    image_size: int | None = Field(None, ge=8)
    """Reconstruction resolution (resize + center crop); None: data.image_size."""
    num_images: int | None = Field(None, ge=1)
    """Images used for reconstruction metrics (None: all)."""
    images: str | None = None
    """Reconstruction image set (folder or .tar, e.g. ImageNet val); None: the recipe's [data]."""
    images_split: str | None = None
    batch_size: int = Field(32, ge=1)
    num_reference_images: int | None = Field(None, ge=2)
    """Images read from a folder/tar/[data] reference (None: all), chosen by eval.subset."""
    subset: Literal["stratified", "uniform", "first"] = "stratified"
    """How num_images / num_reference_images pick their images: "stratified" (seeded, every class keeps its
    share), "uniform" (seeded, uniformly at random) or "first" (sorted order: few classes of a sorted tar)."""
    subset_seed: int = 0
    reference: str | None = None
    """FID reference: image folder / tar, ADM .npz batch or stats file from --make-ref. None: the data set."""
    reference_split: str | None = None
    reconstruction: bool = True
    generation: bool = True
    kid_subsets: int = Field(10, ge=1)
    kid_subset_size: int = Field(1000, ge=2)


class ProbeConfig(Section):
    num_images: int = Field(4, ge=1)
    """Rows of the unmasking figure."""
    score_images: int = Field(64, ge=1)
    """Images behind the numbers (PSNR vs k, order scores) and the channel means used for masking."""
    image_size: int | None = Field(None, ge=8)
    taus: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    channels_shown: int = Field(4, ge=1)
    fill: Literal["dataset_mean", "image_mean", "zero"] = "dataset_mean"
    """Value of a masked channel in the partial decodes: its mean over the score images and positions
    ("dataset_mean"), the image's own spatial mean of that channel ("image_mean"), or 0 ("zero")."""


class VAEConfig(Section):
    """From-scratch VAE training (S4D-VAE / CNN-VAE, blog 002)."""

    kl_schedule: Literal["none", "linear_warmup", "cyclical"] = "linear_warmup"
    kl_warmup_steps: int = Field(500, ge=0)
    kl_max_weight: float = Field(1.0, ge=0.0)
    collapse_threshold: float = Field(0.01, ge=0.0)
    """KL per latent dimension (nats) under which a dimension counts as collapsed."""
    collapse_patience: int = Field(100, ge=1)
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
    bottleneck_channels: int = Field(16, ge=1)
    eval_pairs: str | None = None
    """Folder with NOISY/ and GT/ sub-folders (e.g. ../shared/data/sidd_pairs)."""
    eval_crop: int = Field(256, ge=16)
    """Center crop (pixels) of the real pairs and of eval_images for evaluation (bounded CPU cost)."""
    depth: int = Field(2, ge=1)
    """U-Net levels (each halves the resolution); the bottleneck is at 1/2^depth."""
    blocks_per_level: int = Field(1, ge=1)
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
    probe_depth: int = Field(4, ge=1)
    probe_hidden: int = Field(128, ge=8)
    probe_heads: int = Field(4, ge=1)
    probe_steps: int = Field(2000, ge=1)
    """Fixed training budget of the flow probe (steps of probe_batch latents)."""
    probe_batch: int = Field(64, ge=1)
    probe_lr: float = Field(5e-4, gt=0.0)
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
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    dit: DiTConfig = Field(default_factory=DiTConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    diffusability: DiffusabilityConfig = Field(default_factory=DiffusabilityConfig)

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
