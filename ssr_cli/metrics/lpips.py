"""LPIPS (v0.1): building the network and loading its backbone from a local file (nothing is downloaded)."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from ssr_cli.errors import UserFileNotFoundError, UserValueError, one_line
from ssr_cli.models.weights import WeightsError, read_torch_tensors

# torchvision's file names, so a torch hub cache that already holds them is found without configuration.
_LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


@functools.cache
def _frozen_lpips_class():
    import lpips  # lazy: the optional LPIPS package (and its torchvision backbones) loads only where LPIPS is used

    class FrozenLPIPS(lpips.LPIPS):
        """lpips.LPIPS that stays in eval mode: ``.train()`` on a parent module must not enable the heads' dropout."""

        def train(self, mode: bool = True):  # noqa: ARG002 - mode is ignored on purpose
            return super().train(False)

    return FrozenLPIPS


def _check_lpips_net(net: str) -> None:
    if net not in _LPIPS_BACKBONE_FILES:
        raise UserValueError(f"load_lpips: net must be one of {sorted(_LPIPS_BACKBONE_FILES)}, got {net!r}")


def build_lpips(net: str = "alex"):
    """The LPIPS v0.1 network with its calibrated linear heads (shipped inside the ``lpips`` package) and a
    randomly initialised backbone: the model :func:`load_lpips` fills, and what ``--dry-run`` builds."""
    _check_lpips_net(net)
    with warnings.catch_warnings():
        # lpips builds its torchvision trunk with the deprecated `pretrained=` argument; the trunk is
        # randomly initialized here (pnet_rand=True), so nothing is downloaded.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        return _frozen_lpips_class()(net=net, pretrained=True, pnet_rand=True, verbose=False)


def load_lpips(net: str = "alex", weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """LPIPS v0.1 with its backbone loaded from a local file; frozen, in eval mode, differentiable in its inputs.

    net: "alex" or "vgg". weights_path: a torchvision state dict of the backbone, either features only
    (``features.K.*``, e.g. ``../shared/data/lpips/alexnet-owt-7be5be79.features-only.pth``) or the full
    torchvision checkpoint (``classifier.*`` is ignored); ``None`` looks for torchvision's file in the torch
    hub cache. The calibrated linear heads ship inside the ``lpips`` package.
    Call as ``model(x, y)`` with x, y (B, 3, H, W) in [-1, 1]; returns (B, 1, 1, 1).
    Raises FileNotFoundError when the backbone file is missing.
    """
    _check_lpips_net(net)
    if weights_path is None:
        weights_path = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILES[net]
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise UserFileNotFoundError(
            f"LPIPS backbone weights not found at {weights_path}. Nothing is downloaded at run time: get "
            f"torchvision's ImageNet {net} checkpoint ({_LPIPS_BACKBONE_FILES[net]}, from "
            f"https://download.pytorch.org/models/), or its features-only subset (in this project's shared "
            f"data: lpips/alexnet-owt-7be5be79.features-only.pth), and set the recipe key "
            f"`eval.lpips_weights` (evaluation) or `loss.lpips_weights` (training loss) to its path."
        )
    model = build_lpips(net)
    state = read_torch_tensors(weights_path, f"a torchvision {net} state dict")
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    # Map torchvision's `features.K.*` to lpips' `sliceN.K.*` by the layer index K.
    slice_of_layer = {}
    for name in model.net.state_dict():
        slice_name, layer, _ = name.split(".", 2)
        slice_of_layer[layer] = slice_name
    remapped = {}
    for key, tensor in features.items():
        layer = key.split(".", 1)[0]
        if layer not in slice_of_layer:
            raise WeightsError(f"{weights_path}: unexpected layer `features.{key}` for the LPIPS {net} trunk")
        remapped[f"{slice_of_layer[layer]}.{key}"] = tensor
    try:
        model.net.load_state_dict(remapped, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{weights_path} is not a torchvision {net} state dict (features.K.*): "
                           f"{one_line(err)}") from None

    # lpips loads its heads with strict=False; check they really arrived so a renamed key cannot go unnoticed.
    import lpips  # lazy: see _frozen_lpips_class

    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = torch.load(heads_path, weights_only=True, map_location="cpu")
    own = model.state_dict()
    if not heads or any(k not in own or not torch.equal(own[k], v) for k, v in heads.items()):
        raise RuntimeError(f"LPIPS linear heads from {heads_path} were not loaded into the model")

    model.requires_grad_(False)
    model.eval()
    return model.to(device)
