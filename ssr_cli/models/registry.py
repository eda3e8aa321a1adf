"""Every tokenizer by (family, size): ``build_tokenizer`` and ``parameter_counts``.

Families and their sizes are plain dicts of architecture fields (DiT style); ``**overrides`` replace fields
to build custom sizes (e.g. ``build_tokenizer("kl-ae", "tiny", z_channels=8)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from ssr_cli.errors import UserFileNotFoundError, UserValueError
from ssr_cli.models import s4d
from ssr_cli.models.cosmos import COSMOS_SIZES, build_cosmos
from ssr_cli.models.diffusers_vae import CONFIG, diffusers_folder, params_from_config, read_config
from ssr_cli.models.kl_ae import KL_AE_SIZES, KLAutoEncoder, build_kl_ae
from ssr_cli.models.taesd import TAESD_SIZES, build_taesd
from ssr_cli.models.tokenizer import Tokenizer
from ssr_cli.models.weights import WeightsError, load_weights

# family -> size name -> architecture fields.
TOKENIZER_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "kl-ae": KL_AE_SIZES,
    "cosmos-ci": COSMOS_SIZES,
    "taesd": TAESD_SIZES,
}
_BUILDERS: dict[str, Callable[..., Tokenizer]] = {
    "kl-ae": build_kl_ae,
    "cosmos-ci": build_cosmos,
    "taesd": build_taesd,
}
# The vector-latent VAEs (ssr_cli.models.s4d) are imported on first use: their module is heavier and separate.
VECTOR_VAE_FAMILIES = ("s4d-vae", "cnn-vae")
"""Families with a vector latent, trained from scratch (blog 002) rather than fine-tuned."""


def _vector_vae(family: str) -> tuple[dict[str, dict[str, Any]], Callable[..., Tokenizer]]:
    return {"s4d-vae": (s4d.S4D_VAE_SIZES, s4d.S4DVAE), "cnn-vae": (s4d.CNN_VAE_SIZES, s4d.CNNVAE)}[family]


def families() -> list[str]:
    return [*TOKENIZER_SIZES, *VECTOR_VAE_FAMILIES]


def sizes_of(family: str) -> dict[str, dict[str, Any]]:
    """The named sizes of a family (``tokenizer.family``), or a ValueError listing the families."""
    if family in TOKENIZER_SIZES:
        return TOKENIZER_SIZES[family]
    if family in VECTOR_VAE_FAMILIES:
        return _vector_vae(family)[0]
    raise UserValueError(f"tokenizer.family = {family!r} is unknown; choose one of {families()}")


DIFFUSERS_SIZE = "diffusers"
"""kl-ae pseudo-size: the architecture and latent scale/shift come from a diffusers folder's config.json."""


def _kl_ae_from_diffusers(folder: str | Path | None, overrides: dict[str, Any]) -> Tokenizer:
    from dataclasses import replace

    found = diffusers_folder(folder) if folder is not None else None
    if found is None:
        raise WeightsError(f'tokenizer.size = "{DIFFUSERS_SIZE}" expects tokenizer.weights to be a diffusers VAE '
                           f"folder (config.json + diffusion_pytorch_model.safetensors), found {folder!r}")
    grad_checkpointing = bool(overrides.pop("grad_checkpointing", False))
    params = replace(params_from_config(read_config(found), found / CONFIG), **overrides)
    return KLAutoEncoder(params, grad_checkpointing=grad_checkpointing)


def build_tokenizer(family: str, size: str, *, weights: str | Path | None = None, strict: bool = True,
                    architecture: str | Path | None = None, **overrides: Any) -> Tokenizer:
    """Build a tokenizer and (when ``weights`` is given) load its weights.

    family: "kl-ae" | "cosmos-ci" | "taesd" | "s4d-vae" | "cnn-vae"; size: a key of ``TOKENIZER_SIZES[family]``.
    weights: a local .safetensors / .pt / .pth / .jit file; None keeps the random initialisation.
    strict: raise on any missing, unexpected or mis-shaped key (the error names them).
    overrides: architecture fields replacing the size's (``ch``, ``ch_mult``, ``z_channels``, …) plus
    ``grad_checkpointing`` for the KL-AE and Cosmos families.
    architecture: for kl-ae size "diffusers", the diffusers folder whose config.json gives the architecture
    (default: ``weights``; a fine-tuned export in our layout passes the original folder here).
    """
    sizes = sizes_of(family)
    if family == "kl-ae" and size == DIFFUSERS_SIZE:
        try:
            model = _kl_ae_from_diffusers(architecture if architecture is not None else weights, dict(overrides))
        except TypeError as exc:
            raise UserValueError(f"tokenizer.overrides {overrides} do not fit kl-ae/{size}: {exc}") from exc
        if weights is not None:
            load_weights(model, weights, strict=strict)
        return model
    if size not in sizes:
        raise UserValueError(f"tokenizer.size = {size!r} is not a {family} size; choose one of {sorted(sizes)}")
    try:
        if family in VECTOR_VAE_FAMILIES:
            model = _vector_vae(family)[1](**{**sizes[size], **overrides})
        else:
            model = _BUILDERS[family](size, **overrides)
    except TypeError as exc:  # e.g. an override of the wrong type
        raise UserValueError(f"tokenizer.overrides {overrides} do not fit {family}/{size}: {exc}") from exc
    if weights is not None:
        try:
            load_weights(model, weights, strict=strict)
        except FileNotFoundError as exc:
            hint = WEIGHTS_SOURCES.get((family, size))
            raise UserFileNotFoundError(f"{exc}; {hint}" if hint else str(exc)) from None
    return model


# Where users get the pretrained files these sizes load (a hint in the missing-file error).
WEIGHTS_SOURCES = {
    ("kl-ae", "flux"): "the Flux AE is the `ae.safetensors` file of the FLUX.1 model repositories "
                       "(black-forest-labs); download it and set tokenizer.weights to its path",
    ("kl-ae", "sd"): "use an SD-VAE checkpoint in the original LDM key layout (e.g. a `vae-ft-mse` .safetensors) "
                     'or its diffusers folder with tokenizer.size = "diffusers"',
    ("kl-ae", "vavae"): "VA-VAE f16d32 is `vavae-imagenet256-f16d32-dinov2.pt` of the Hugging Face repository "
                        "hustvl/vavae-imagenet256-f16d32-dinov2 (linked from the hustvl/LightningDiT README; its "
                        "latents_stats.pt is there too)",
    ("kl-ae", "diffusers"): "give the diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)",
    ("cosmos-ci", "ci16x16"): "the NVIDIA Cosmos-Tokenizer CI16x16 release ships TorchScript encoder/decoder "
                              "files; pass one of them (or a state dict saved from them)",
    ("cosmos-ci", "ci8x8"): "the NVIDIA Cosmos-Tokenizer CI8x8 release ships TorchScript encoder/decoder files",
    ("taesd", "taesd"): "taesd_encoder.pth / taesd_decoder.pth from madebyollin/taesd",
    ("taesd", "taef1"): "taef1_encoder.pth / taef1_decoder.pth from madebyollin/taesd",
    ("taesd", "taef2"): "taef2_encoder.pth / taef2_decoder.pth from madebyollin/taesd (a copy is in "
                        "../shared/data/taesd/ on the project machines)",
}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, trainable (requires_grad), encoder (the modules ``encode`` uses), decoder (rest)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    encoder_ids: set[int] = set()
    encoder = 0
    for module in model.encoder_modules():
        for p in module.parameters():
            if id(p) not in encoder_ids:
                encoder_ids.add(id(p))
                encoder += p.numel()
    return dict(total=total, trainable=trainable, encoder=encoder, decoder=total - encoder)
