"""The diffusers ``AutoencoderKL`` folder layout, read into and written from our LDM-layout KL-AE.

A diffusers VAE folder (SD-VAE, the FLUX VAE in ``vae/``, EQ-VAE and REPA-E releases) holds ``config.json``
(architecture and the latent ``scaling_factor`` / ``shift_factor``) and ``diffusion_pytorch_model.safetensors``
(or ``.bin``). Its network is the LDM first stage under other names; the mapping, ours → diffusers:

  ``{encoder,decoder}.norm_out``            → ``conv_norm_out``
  ``encoder.down.i.block.j``                → ``encoder.down_blocks.i.resnets.j`` (``nin_shortcut`` → ``conv_shortcut``)
  ``encoder.down.i.downsample.conv``        → ``encoder.down_blocks.i.downsamplers.0.conv``
  ``decoder.up.i.block.j``                  → ``decoder.up_blocks.(L−1−i).resnets.j`` (diffusers stores the
                                              decoder levels in execution order, we in resolution order)
  ``*.mid.block_1`` / ``block_2``           → ``mid_block.resnets.0`` / ``1``
  ``*.mid.attn_1.{norm,q,k,v,proj_out}``    → ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
                                              (1×1 convs there are linears: weights (C, C, 1, 1) ↔ (C, C))
Older diffusers files name the attention ``query/key/value/proj_attn``; those are accepted too. The conversion
is exact: every key has one partner, and a key that has none is reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ssr_cli.engine.atomic import write_text_atomic
from ssr_cli.models.kl_ae import KLAEParams, KLAutoEncoder
from ssr_cli.models.weights import WeightsError, load_weights, save_weights

CONFIG = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_folder(path: str | Path) -> Path | None:
    """The folder holding a diffusers VAE's ``config.json`` for ``path`` (the folder itself, its ``vae/``, or the
    folder of a ``diffusion_pytorch_model.*`` file); None when ``path`` is not one."""
    path = Path(path).expanduser()
    candidates = [path, path / "vae"] if path.is_dir() else [path.parent] if path.name in WEIGHT_FILES else []
    for folder in candidates:
        if (folder / CONFIG).is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
            return folder
    return None


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: a diffusers VAE folder needs one of {list(WEIGHT_FILES)}, found none")


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable diffusers config.json ({exc})") from exc


def params_from_config(config: dict, source: str | Path = CONFIG) -> KLAEParams:
    """Our KL-AE architecture (and latent normalisation) for a diffusers ``AutoencoderKL`` config."""

    def bad(what: str, found) -> WeightsError:
        return WeightsError(f"{source}: expected an AutoencoderKL config with {what}, found {found!r}")

    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise bad('_class_name "AutoencoderKL"', name)
    blocks = [int(b) for b in config.get("block_out_channels", (64,))]
    levels = len(blocks)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [kind]))
        if types != [kind] * levels:
            raise bad(f"{key} = {levels} × {kind} (one per block_out_channels entry)", types)
    if config.get("act_fn", "silu") != "silu":
        raise bad('act_fn "silu"', config.get("act_fn"))
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise bad(f"block_out_channels that are multiples of the first ({ch})", blocks)
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise bad(f"{key} = null (per-channel latent statistics are not supported; the latent cache "
                      "computes its own per-channel statistics for the DiT)", config[key])
    use_quant = bool(config.get("use_quant_conv", True))
    if use_quant != bool(config.get("use_post_quant_conv", True)):
        raise bad("use_quant_conv equal to use_post_quant_conv", (use_quant, config.get("use_post_quant_conv")))
    shift = config.get("shift_factor")
    return KLAEParams(
        ch=ch, ch_mult=tuple(b // ch for b in blocks), num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=int(config.get("latent_channels", 4)), quant_conv=use_quant,
        scale_factor=float(config.get("scaling_factor", 0.18215)), shift_factor=float(shift or 0.0),
        in_channels=int(config.get("in_channels", 3)), out_ch=int(config.get("out_channels", 3)),
        norm_groups=int(config.get("norm_num_groups", 32)),
        mid_attention=bool(config.get("mid_block_add_attention", True)),
    )


def config_from_params(params: KLAEParams, sample_size: int = 256) -> dict:
    """The diffusers ``config.json`` of our KL-AE (the inverse of :func:`params_from_config`)."""
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": params.in_channels,
        "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * int(m) for m in params.ch_mult],
        "layers_per_block": params.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": params.z_channels,
        "norm_num_groups": params.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": params.scale_factor,
        "shift_factor": params.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": params.quant_conv,
        "use_post_quant_conv": params.quant_conv,
        "mid_block_add_attention": params.mid_attention,
    }


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of one of our KL-AE state-dict keys (``levels`` = len(ch_mult))."""
    half, rest = key.split(".", 1) if "." in key else (key, "")
    if half in ("quant_conv", "post_quant_conv"):
        return key
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    if m := re.match(r"^(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)$", rest):
        kind, level, part, tail = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        if part == "block":
            index, tail = tail.split(".", 1)
            rest = f"{kind}_blocks.{level}.resnets.{index}.{tail.replace('nin_shortcut.', 'conv_shortcut.')}"
        else:
            rest = f"{kind}_blocks.{level}.{part}rs.0.{tail}"
    elif m := re.match(r"^mid\.block_([12])\.(.*)$", rest):
        rest = f"mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2).replace('nin_shortcut.', 'conv_shortcut.')}"
    elif m := re.match(r"^mid\.attn_1\.(\w+)\.(.*)$", rest):
        rest = f"mid_block.attentions.0.{_ATTN[m.group(1)]}.{m.group(2)}"
    return f"{half}.{rest}"


def _is_attn_linear(diffusers_name: str) -> bool:
    return bool(re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_name))


def from_diffusers(state: dict[str, torch.Tensor], model: KLAutoEncoder, source: str) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict renamed (and attention weights reshaped) into ``model``'s layout.

    Every file key must have a partner in the model and vice versa; otherwise one WeightsError names them.
    """
    levels = len(model.params.ch_mult)
    for old, new in _LEGACY_ATTN.items():
        state = {re.sub(rf"(attentions\.0\.){old}\.", rf"\g<1>{new}.", k): v for k, v in state.items()}
    names = {diffusers_key(k, levels): k for k in model.state_dict()}
    out, unmapped = {}, []
    for key, value in state.items():
        if key not in names:
            unmapped.append(key)
            continue
        out[names[key]] = value[:, :, None, None] if _is_attn_linear(key) and value.ndim == 2 else value
    missing = [k for d, k in names.items() if d not in state]
    if unmapped or missing:
        raise WeightsError(
            f"{source}: diffusers AutoencoderKL keys do not match its config.json architecture: "
            f"{len(unmapped)} in the file without a place in the model {unmapped[:6]}, "
            f"{len(missing)} expected but missing {[diffusers_key(k, levels) for k in missing[:6]]}"
        )
    return out


def to_diffusers(model: KLAutoEncoder) -> dict[str, torch.Tensor]:
    """Our KL-AE's state dict in the diffusers ``AutoencoderKL`` layout."""
    levels = len(model.params.ch_mult)
    out = {}
    for key, value in model.state_dict().items():
        name = diffusers_key(key, levels)
        out[name] = value[:, :, 0, 0] if _is_attn_linear(name) else value
    return out


def load_diffusers_vae(path: str | Path, *, strict: bool = True) -> KLAutoEncoder:
    """Build our KL-AE from a diffusers VAE folder's config.json and load its weights (exactly)."""
    folder = diffusers_folder(path)
    if folder is None:
        raise WeightsError(f"{path}: expected a diffusers VAE folder ({CONFIG} + {WEIGHT_FILES[0]}, or a vae/ "
                           "folder holding them), found none")
    model = KLAutoEncoder(params_from_config(read_config(folder), folder / CONFIG))
    load_weights(model, folder, strict=strict)
    return model


def export_diffusers(model: KLAutoEncoder, folder: str | Path, sample_size: int = 256) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` so ``AutoencoderKL.from_pretrained`` reads it."""
    if not isinstance(model, KLAutoEncoder):
        raise WeightsError(f"the diffusers AutoencoderKL layout holds a kl-ae tokenizer, not {type(model).__name__}")
    if model.params.attn_levels():
        raise WeightsError(f"kl-ae with attention in its down/up levels (attn_resolutions = "
                           f"{list(model.params.attn_resolutions)}, e.g. VA-VAE) has no DownEncoderBlock2D / "
                           "UpDecoderBlock2D export; keep it in the LDM layout (the run's tokenizer.safetensors)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(to_diffusers(model), folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    write_text_atomic(folder / CONFIG, json.dumps(config_from_params(model.params, sample_size), indent=2) + "\n")
    return folder
