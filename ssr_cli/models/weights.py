"""Loading and saving tokenizer weights in their original key layout.

Sources (``tokenizer.weights`` in a recipe):
  ``*.safetensors``                 safetensors file;
  ``*.pt`` / ``*.pth`` / ``*.ckpt`` / ``*.bin``   ``torch.load(weights_only=True)`` of a dict of tensors (a
                                    Lightning-style ``{"state_dict": {...}}`` is unwrapped);
  ``*.jit``                         a TorchScript archive (how Cosmos ships); only its state_dict is used;
  a folder                          a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.*``,
                                    or a pipeline folder with them in ``vae/``): its weights file is read.
Files are local: nothing is downloaded at run time (a URL is refused with that explanation).
Loading is strict by default; a :class:`KeyReport` lists missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ssr_cli.engine.atomic import atomic_path
from ssr_cli.errors import UserError, UserFileNotFoundError, one_line

RECIPE_KEY = "tokenizer.weights"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class WeightsError(UserError, ValueError):
    """A weights file does not match the model (the message names the keys) or cannot be read."""


@dataclass
class KeyReport:
    """Differences between a checkpoint and a model's state dict."""

    missing: list[str] = field(default_factory=list)
    """In the model, not in the file."""
    unexpected: list[str] = field(default_factory=list)
    """In the file, not in the model."""
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(key, shape in the model, shape in the file)."""
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    """In the file, not in the model, and dropped on purpose: under one of the model's ``skip_prefixes``
    (training-only heads such as a checkpoint's loss networks)."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, max_items: int = 12) -> str:
        def clip(items: list[str]) -> str:
            more = f", … (+{len(items) - max_items} more)" if len(items) > max_items else ""
            return ", ".join(items[:max_items]) + more

        lines = [f"{self.loaded} tensors match"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} training-only skipped: " + clip(self.skipped))
        if self.mismatched:
            shapes = [f"{k}: model {tuple(m)} vs file {tuple(f)}" for k, m, f in self.mismatched]
            lines.append(f"{len(self.mismatched)} mis-shaped: " + clip(shapes))
        if self.missing:
            lines.append(f"{len(self.missing)} missing from the file: " + clip(self.missing))
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected in the file: " + clip(self.unexpected))
        return "\n".join(lines)


def compare_state_dicts(model_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]) -> KeyReport:
    report = KeyReport()
    for key, tensor in model_state.items():
        if key not in file_state:
            report.missing.append(key)
        elif tuple(file_state[key].shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(file_state[key].shape)))
        else:
            report.loaded += 1
    report.unexpected = [k for k in file_state if k not in model_state]
    return report


def read_safetensors(path: str | Path, what: str = "a safetensors weights file") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU; a damaged or foreign file (a pickle under that name, say:
    it is never unpickled) is one WeightsError line naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged or foreign file
        raise WeightsError(f"{path}: expected {what}, but it cannot be read as safetensors ({one_line(exc)})") from None


def read_torch_tensors(path: str | Path, what: str, hint: str = ""):
    """``torch.load(path, weights_only=True)`` on the CPU: no pickled code runs. A file it refuses (code, objects
    other than tensors) or cannot read is one WeightsError line: ``{path}: expected {what} …{hint}``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise WeightsError(f"{path}: expected {what} readable with weights_only=True, found an unreadable or unsafe "
                           f"file ({one_line(exc)}){hint}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU (dtypes as stored)."""
    if str(path).startswith(("hf://", "http://", "https://")):
        raise WeightsError(f"{RECIPE_KEY} = {str(path)!r}: weights are read from local files only (nothing is "
                           "downloaded at run time); download the file yourself and give its path")
    path = Path(path).expanduser()
    if path.is_dir():
        # lazy: diffusers_vae imports this module (cycle)
        from ssr_cli.models.diffusers_vae import WEIGHT_FILES, diffusers_folder, weights_file

        folder = diffusers_folder(path)
        if folder is None:
            raise WeightsError(f"{path}: expected a weights file or a diffusers folder (config.json + "
                               f"{WEIGHT_FILES[0]}, or vae/ holding them), found a folder without them")
        path = weights_file(folder)
    if not path.is_file():
        raise UserFileNotFoundError(
            f"weights file not found: {path} (check {RECIPE_KEY}, or leave it unset for random init)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = read_safetensors(path)
    elif suffix in _TORCH_SUFFIXES:
        state = read_torch_tensors(path, "a plain tensor checkpoint",
                                   "; convert it to .safetensors or save only the state_dict")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    elif suffix == ".jit":
        # TorchScript archive: the graph is deserialised but never run; only the tensors are kept.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice; the format is what ships
            try:
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError (and others) for a foreign file
                raise WeightsError(f"{path}: expected a TorchScript archive, but it cannot be read as one "
                                   f"({one_line(exc)})") from None
    else:
        raise WeightsError(
            f"{path}: unsupported weights format {suffix!r}; use .safetensors, .pt/.pth/.ckpt/.bin, .jit or a "
            "diffusers folder"
        )
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {bad[:8]}; save only the model's state_dict")
    return dict(state)


def partner_file(source: str | Path) -> tuple[str, Path] | None:
    """For a split checkpoint half (file name containing "encoder" or "decoder"): (its half, the other half's path).

    The partner's name replaces the last "encoder" with "decoder" or vice versa (``taef2_encoder.pth`` ->
    ``taef2_decoder.pth``, ``encoder.jit`` -> ``decoder.jit``). None when the name says neither.
    """
    path = Path(source)
    for own, other in (("encoder", "decoder"), ("decoder", "encoder")):
        head, sep, tail = path.name.rpartition(own)
        if sep:
            return own, path.with_name(head + other + tail)
    return None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> KeyReport:
    """Load ``path`` into ``model`` in place; returns the :class:`KeyReport`.

    strict: any missing / unexpected / mis-shaped key raises :class:`WeightsError` naming the keys.
    Not strict: only keys with matching names and shapes are loaded, and a warning lists the rest.
    A model may define ``adapt_state_dict(state, source) -> state`` to accept its original file layouts, and
    ``skip_prefixes``: file keys under these prefixes that the model lacks are dropped, listed in
    ``report.skipped`` and named in one printed line (an explicit list, not a relaxed strictness).
    """
    state = load_state_dict_file(path)
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state, str(path))
    model_state = model.state_dict()
    prefixes = tuple(getattr(model, "skip_prefixes", ()))
    skipped = [k for k in state if prefixes and k not in model_state and k.startswith(prefixes)]
    state = {k: v for k, v in state.items() if k not in skipped_set} if (skipped_set := set(skipped)) else state
    report = compare_state_dicts(model_state, state)
    report.skipped = skipped
    if skipped:
        from ssr_cli.engine.progress import console  # lazy: models/ imports no engine module at load time

        groups = sorted({p for p in prefixes for k in skipped if k.startswith(p)})
        console.print(f"{path}: skipped {len(skipped)} training-only tensors ({', '.join(p + '*' for p in groups)}; "
                      "not used to encode/decode)", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        message = (
            f"weights {path} do not match {type(model).__name__}:\n{report.format()}\n"
            "Check the tokenizer family/size (and tokenizer.overrides) against the file"
        )
        if strict:
            raise WeightsError(message + ", or set tokenizer.strict = false to load only the matching tensors.")
        warnings.warn(message + "; loading only the matching tensors (tokenizer.strict = false).", stacklevel=2)
    matching = {k: v for k, v in state.items() if k in model_state and tuple(v.shape) == tuple(model_state[k].shape)}
    with torch.no_grad():
        model.load_state_dict(matching, strict=False)  # copies into the model's own dtype and device
    return report


def save_weights(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict (same key layout as loaded) to ``.safetensors`` or ``.pt``/``.pth``, atomically.

    Tensors are saved on the CPU in their current dtype; safetensors metadata must be strings.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # clone: safetensors refuses tensors that share storage, and the file must not alias live parameters.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise WeightsError(f"{path}: save as .safetensors or .pt/.pth")
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(tensors, tmp)
    return path
