"""Real-image test inputs for the FID tests, and the committed Inception features of them.

The generation-metric tests score 150 CIFAR-10 test images and 150 Kodak crops against a reference made from
another 150 CIFAR-10 test images. Their Inception-v3 features at 299² cost about 170 s of one CPU core, more
than any other test input; they are committed instead (``tests/data/real_image_features.npz``, float16) and
made again by::

    python tests/real_images.py

The test suite keeps them honest: ``test_committed_real_image_features_match_the_extractor`` extracts a spread
of the rows again from the same images on every run and requires the committed rows (to float16 rounding);
the file also records the weights' SHA-256, so features from other weights are refused, not used.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[0].parent / "shared" / "data"
INCEPTION_FILE = "inception/pt_inception-2015-12-05-reconstructed-nofc.pth"
FEATURES_FILE = HERE / "data" / "real_image_features.npz"
N_PER_SET = 150
"""Images per set: CIFAR-10 half A (the reference), half B, Kodak crops."""
CIFAR_SEED, KODAK_SEED = 0, 1
BATCH_SIZE = 50
SETS = ("cifar_a", "cifar_b", "kodak")


def cifar_test_images(root: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` CIFAR-10 test images (uint8 NCHW), a seeded random choice from the test tar."""
    from PIL import Image

    with tarfile.open(root / "cifar10/test_10000.tar") as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name
        )
        chosen = np.random.default_rng(seed).permutation(len(members))[:count]
        arrays = [
            np.asarray(Image.open(io.BytesIO(archive.extractfile(members[i]).read())).convert("RGB")) for i in chosen
        ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def kodak_crops(root: Path, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded random 32² crops (uint8 NCHW) of the Kodak photos downscaled 4× (to 192×128 / 128×192)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted((root / "kodak24").glob("kodim*.png"))]
    photos = [np.asarray(p.resize((p.width // 4, p.height // 4), Image.BICUBIC)) for p in photos]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 31), rng.integers(0, photo.shape[1] - 31)
        crops.append(photo[top : top + 32, left : left + 32])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def real_images(root: Path = SHARED_DATA) -> torch.Tensor:
    """The three sets in order (cifar_a, cifar_b, kodak): (3 × N_PER_SET, 3, 32, 32) uint8."""
    return torch.cat([cifar_test_images(root, 2 * N_PER_SET, CIFAR_SEED), kodak_crops(root, N_PER_SET, KODAK_SEED)])


def weights_sha256(root: Path = SHARED_DATA) -> str:
    return hashlib.sha256((root / INCEPTION_FILE).read_bytes()).hexdigest()


def make(root: Path = SHARED_DATA, out: Path = FEATURES_FILE) -> Path:
    """Extract and write the committed features (about 3 minutes on one CPU core)."""
    from ssr_cli import metrics as M

    extractor = M.InceptionFeatures(root / INCEPTION_FILE)
    feats = M.extract_features(real_images(root), extractor, batch_size=BATCH_SIZE, keep=("pool", "spatial"))
    meta = {"n_per_set": N_PER_SET, "sets": list(SETS), "cifar_seed": CIFAR_SEED, "kodak_seed": KODAK_SEED,
            "batch_size": BATCH_SIZE, "inception_sha256": weights_sha256(root), "torch": torch.__version__,
            "made_by": "python tests/real_images.py"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, pool=feats["pool"].astype(np.float16), spatial=feats["spatial"].astype(np.float16),
                        meta=np.array(json.dumps(meta)))
    tmp.replace(out)
    return out


def load(root: Path = SHARED_DATA, path: Path = FEATURES_FILE) -> dict[str, np.ndarray]:
    """The committed rows as float64 ``pool`` (450, 2048) and ``spatial`` (450, 2023), checked against the
    weights they were made from."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make it with `python tests/real_images.py`")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        rows = {k: data[k].astype(np.float64) for k in ("pool", "spatial")}
    if meta["inception_sha256"] != weights_sha256(root) or meta["n_per_set"] != N_PER_SET:
        raise ValueError(f"{path} was made from other Inception weights or another image count: make it again "
                         "with `python tests/real_images.py`")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"wrote {make()}")
