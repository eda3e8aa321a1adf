"""Image data sets and the deterministic, step-indexed batch source.

Sources: an image folder (ImageNet layout, class = sub-folder), a tar of images read in place
(members ``split/<class>/<file>``), WebDataset ``.tar`` shards (samples grouped by key, read in stream order),
and a built-in set of random crops of the photographs that ship inside scikit-image (works on any machine,
no files needed).

Every item is addressed by ``(index, aug_seed)``: the random crop and flip of an item are a function
of its seed, and the seeds and the order are a function of the training step, so a resumed run sees
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from ssr_cli.engine.runtime import step_seed
from ssr_cli.errors import UserError, UserFileNotFoundError, UserValueError
from ssr_cli.inputs import file_identity

log = logging.getLogger("ssr.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

# Photographs bundled with scikit-image (no download needed); the built-in data set's classes.
BUILTIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
    "camera",
    "moon",
)


_REPORTED: set[str] = set()
"""Unreadable images already warned about in this process."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, by value range rather than by clipping: 16-bit greyscale (``I;16*``, or ``I``
    holding 0…65535) is scaled by 255/65535, 32-bit float (``F``) is read as 0…1 when it lies there (else as
    0…255), and transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, see :func:`to_rgb`) -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div_(127.5).sub_(1.0)


def transform_image(
    img: Image.Image,
    size: int,
    *,
    resize: bool = True,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, with box pre-filtering when shrinking a lot, as ADM
    does), crop ``size``×``size`` (center or random), optionally flip; -> (3, size, size) in [-1, 1]."""
    img = to_rgb(img)
    if resize:
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
        scale = size / min(img.size)
        img = img.resize(tuple(max(size, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    if w < size or h < size:
        raise UserValueError(f"image of {w}x{h} is smaller than the crop size {size} (set data.resize = true)")
    if random_crop and rng is not None:
        left = int(rng.integers(0, w - size + 1))
        top = int(rng.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = pil_to_tensor(img)
    if random_flip and rng is not None and rng.random() < 0.5:
        x = x.flip(-1)
    return x


class ImageDataset(Dataset):
    """Base: subclasses list ``items`` and implement ``_open(i) -> PIL image``; labels in ``labels``."""

    def __init__(
        self,
        image_size: int,
        *,
        resize: bool = True,
        random_crop: bool = False,
        random_flip: bool = False,
    ) -> None:
        self.image_size = image_size
        self.resize = resize
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.labels: list[int] = []
        self.classes: list[str] = []
        self.bad: set[int] = set()
        self.max_bad_fraction = 1.0
        self.bad_log: Path | None = None
        """Where each unreadable image is listed (one line each), when set."""

    streaming = False
    """True: training reads the items in their stored order, epoch after epoch (no seeded permutation)."""

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return str(i)

    def _open(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int, aug_seed: int | None = None) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng(aug_seed) if aug_seed is not None else None
        img = self._open(i)
        x = transform_image(
            img,
            self.image_size,
            resize=self.resize,
            random_crop=self.random_crop,
            random_flip=self.random_flip,
            rng=rng,
        )
        return x, self.labels[i]

    def __getitem__(self, key: int | tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        # A corrupt or unreadable image is reported and replaced by the next readable one, so a long
        # run keeps going and the batch keeps its shape (the replacement is deterministic).
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            if i in self.bad:
                continue
            try:
                return self.load(i, aug_seed)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                self.bad.add(i)
                name = self.describe(i)
                if name not in _REPORTED:  # one warning per file and process, however many data sets read it
                    _REPORTED.add(name)
                    warnings.warn(f"skipping unreadable image {name}: {exc}", stacklevel=2)
                    if self.bad_log is not None:
                        self.bad_log.parent.mkdir(parents=True, exist_ok=True)
                        with open(self.bad_log, "a") as fh:
                            fh.write(f"{name}\t{exc}\n")
                if len(self.bad) > self.max_bad_fraction * len(self):
                    where = f"; the list is in {self.bad_log}" if self.bad_log is not None else ""
                    raise UserError(f"{len(self.bad)} of {len(self)} images are unreadable (more than "
                                    f"data.max_unreadable_fraction = {self.max_bad_fraction}), e.g. {name}{where}; "
                                    "fix or remove them, or raise the fraction")
        raise UserError("no readable image in the data set (check data.path)")


class ImageFolder(ImageDataset):
    """``root/<class>/<image>`` (ImageNet layout); images directly under root get class 0."""

    def __init__(self, root: str | Path, image_size: int, **kw) -> None:
        super().__init__(image_size, **kw)
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserFileNotFoundError(f"image folder not found: {self.root} (set data.path)")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise UserFileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        rel_classes = sorted({p.relative_to(self.root).parts[0] for p in files if len(p.relative_to(self.root).parts) > 1})
        self.classes = rel_classes or ["all"]
        index = {c: k for k, c in enumerate(self.classes)}
        self.files = files
        self.labels = [
            index[p.relative_to(self.root).parts[0]] if len(p.relative_to(self.root).parts) > 1 else 0 for p in files
        ]

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def _open(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as img:
            img.load()
            return img.copy()


def _image_from_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


class _ArchiveImages(ImageDataset):
    """Images read in place from archive files through a cached open handle ``_fh`` (one per worker process:
    it is dropped when the data set is pickled into a DataLoader worker)."""

    _fh = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        return state


_USTAR_FILE_TYPES = (b"0", b"\0", b"7")
"""Header type flags of a regular file (tarfile's REGTYPE, AREGTYPE, CONTTYPE)."""
_USTAR_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
"""Links, devices, directories and FIFOs: no data blocks follow their header."""
_USTAR_READ_TYPES = _USTAR_FILE_TYPES + _USTAR_NO_DATA_TYPES + (b"g",)
"""Types read here (plain headers and pax global headers); any other (pax or GNU long-name records, sparse
files) is left to tarfile."""


def tar_file_members(path: str | Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in an uncompressed tar, in archive order, as
    ``tarfile`` gives them (``member.name``, ``member.offset_data``, ``member.size`` of ``member.isfile()``).

    Kept per process for the file as it is now (its device, inode, size and modification time): a pipeline builds
    the same data set several times (training, fixed images, evaluation, the probe), each a second for CIFAR-10.
    """
    return list(_tar_file_members_cached(*file_identity(path)))


@functools.lru_cache(maxsize=8)
def _tar_file_members_cached(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> tuple:
    return tuple(_read_tar_file_members(path))


def _read_tar_file_members(path: str | Path) -> list[tuple[str, int, int]]:
    """:func:`tar_file_members` without the cache.

    Reads the 512-byte headers directly, about 4× faster than iterating ``tarfile`` (whose member objects cost
    ~50 µs each: 2.5 s for CIFAR-10's 50,000-member train tar, paid by every process that opens it). An archive
    with anything but plain ustar/v7 headers and harmless pax global headers (pax or GNU long-name records,
    sparse members, base-256 sizes) is read with ``tarfile`` instead, as is one whose header checksum does not
    match or whose last member runs past the end of the file (tarfile then says what is wrong)."""
    found: list[tuple[str, int, int]] = []
    encoding = sys.getfilesystemencoding()
    with open(path, "rb") as fh:
        end = os.fstat(fh.fileno()).st_size
        offset = 0
        while offset + 512 <= end:
            fh.seek(offset)
            header = fh.read(512)
            if header.count(0) == 512:  # end-of-archive block
                break
            kind = header[156:157]
            try:
                chksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:  # not octal digits (base-256 sizes included)
                return _tar_file_members_slow(path)
            if kind not in _USTAR_READ_TYPES or chksum != sum(header[:148]) + 256 + sum(header[156:]):
                return _tar_file_members_slow(path)
            if kind == b"g":  # a pax global header (git archive writes one with a comment): only harmless keys
                if not _pax_keys(fh.read(size)) <= _PAX_HARMLESS:
                    return _tar_file_members_slow(path)
                offset += 512 + -(-size // 512) * 512
                continue
            name = header[:100].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0]  # tarfile reads it whatever the magic says
            if prefix:
                name = prefix.decode(encoding, "surrogateescape") + "/" + name
            if kind in _USTAR_FILE_TYPES and not (kind == b"\0" and name.endswith("/")):  # v7's directory
                found.append((name, offset + 512, size))
            if kind not in _USTAR_NO_DATA_TYPES:
                offset += -(-size // 512) * 512
            offset += 512
            if offset > end:  # truncated: tarfile raises its own error
                return _tar_file_members_slow(path)
    return found


_PAX_HARMLESS = {"comment", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"}
"""pax keys that change neither a member's name, size nor place."""


def _pax_keys(records: bytes) -> set[str]:
    """The keys of pax records ``b"<length> <key>=<value>\\n"…``; a malformed block gives {"?"}."""
    keys, pos = set(), 0
    while pos < len(records) and records[pos] != 0:
        space = records.find(b" ", pos)
        try:
            length = int(records[pos:space])
        except ValueError:
            return {"?"}
        record = records[space + 1: pos + length]
        if length <= 0 or b"=" not in record:
            return {"?"}
        keys.add(record.split(b"=", 1)[0].decode("utf-8", "replace"))
        pos += length
    return keys


def _tar_file_members_slow(path: str | Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


@functools.lru_cache(maxsize=8)
def _tar_image_index(split: str | None, path: str, dev: int, ino: int, size: int, mtime_ns: int) -> tuple:
    """(members, labels, classes) of :class:`TarImages`, kept per process for the file as it is now (a pipeline
    opens the same tar for training, its fixed images, evaluation and the probe). Its listing is read afresh, not
    through :func:`tar_file_members`' cache, so a large tar's members are held once."""
    entries = []
    for name, offset, size_ in _read_tar_file_members(path):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            # Path(name).parts for a relative name, without a Path per member (a second for 50,000)
            parts = Path(name).parts if name.startswith("/") else [p for p in name.split("/") if p not in ("", ".")]
            if split is not None:
                if parts[0] != split:
                    continue
                parts = parts[1:]
            cls = parts[0] if len(parts) > 1 else "all"
            entries.append((name, offset, size_, cls))
    entries.sort()
    classes = sorted({e[3] for e in entries})
    index = {c: k for k, c in enumerate(classes)}
    return (tuple((name, off, n) for name, off, n, _ in entries), tuple(index[e[3]] for e in entries),
            tuple(classes))


class TarImages(_ArchiveImages):
    """Images inside a tar file, read in place by offset (members ``split/<class>/<file>``)."""

    def __init__(self, path: str | Path, image_size: int, split: str | None = None, **kw) -> None:
        super().__init__(image_size, **kw)
        self.path = Path(path)
        if not self.path.is_file():
            raise UserFileNotFoundError(f"tar file not found: {self.path} (set data.path)")
        members, labels, classes = _tar_image_index(split, *file_identity(self.path))
        if not members:
            raise UserFileNotFoundError(f"no images in {self.path}" + (f" under '{split}/'" if split else ""))
        self.classes, self.members, self.labels = list(classes), list(members), list(labels)
        self._fh = None

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.members[i][0]}"

    def _open(self, i: int) -> Image.Image:
        if self._fh is None:  # one handle per worker process
            self._fh = open(self.path, "rb")
        _, offset, size = self.members[i]
        self._fh.seek(offset)
        return _image_from_bytes(self._fh.read(size))


WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "pnm", "tif", "tiff")
"""WebDataset sample keys (file extensions) read as the image, first present wins."""
WDS_LABEL_KEY = "cls"


def shard_paths(source: str | Path) -> list[Path]:
    """The ``.tar`` shards ``data.path`` names: one file, a folder (its ``*.tar`` in name order) or a brace
    pattern such as ``shards-{000000..000009}.tar`` (expanded by webdataset, in its order). Local files only."""
    from webdataset.shardlists import expand_urls

    text = str(source)
    if "://" in text or text.startswith("pipe:"):
        raise UserError(f"data.path = {text!r}: webdataset shards are read from local files only; copy them to "
                        "this machine (or a mounted file system) and give their path")
    path = Path(text).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards:
            raise UserFileNotFoundError(f"no .tar shards in the folder {path} (set data.path)")
        return shards
    shards = [Path(p).expanduser() for p in expand_urls(text)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserFileNotFoundError(f"webdataset shard(s) not found: {', '.join(missing[:3])}{more} (set data.path to "
                                    "a .tar, a folder of them or a brace pattern like shards-{000000..000009}.tar)")
    return shards


def _tar_entries(shard: Path):
    """``{"fname", "data": (offset, size), "__url__"}`` per regular member of one shard, then webdataset's
    end-of-shard marker ``{}``; meta members whose first path part is ``__…__`` are left out as its reader does."""
    try:
        with tarfile.open(shard, "r:") as tf:
            members = [m for m in tf if m.isreg()]
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{shard}: not a readable tar shard ({exc}); replace it or leave it out of data.path") from exc
    for m in members:
        first = m.name.split("/", 1)[0]
        if len(first) >= 4 and first.startswith("__") and first.endswith("__"):  # e.g. __index__, __meta__/…
            continue
        yield {"fname": m.name, "data": (m.offset_data, m.size), "__url__": str(shard)}
    yield {}


class WebDatasetShards(_ArchiveImages):
    """Samples of WebDataset ``.tar`` shards, in stream order (shards as listed, members in tar order).

    Members are grouped into samples by webdataset's own rule (``webdataset.tariterators.group_by_keys``: the
    key is the name up to the first dot of the file name, suffixes lower-cased, a new key or a new shard starts
    a sample). The image is the first of :data:`WDS_IMAGE_KEYS` present; the label is the integer in ``cls``
    when the samples have one (else 0). Only the tar headers and the small ``cls`` members are read up front;
    images are read in place by offset. A sample whose image is missing or does not decode is skipped and
    counted like any unreadable image of the other sources.
    """

    streaming = True

    def __init__(self, source: str | Path, image_size: int, **kw) -> None:
        from webdataset.tariterators import group_by_keys

        super().__init__(image_size, **kw)
        self.shards = shard_paths(source)
        self.samples: list[tuple[int, str, str | None, tuple[int, int] | None]] = []
        """(shard index, key, image suffix, (offset, size) of the image member)"""
        self._fh = None
        index = {str(p): k for k, p in enumerate(self.shards)}
        cls_at: list[tuple[int, int] | None] = []
        for shard in self.shards:
            try:
                for sample in group_by_keys(_tar_entries(shard)):
                    image = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                    self.samples.append((index[sample["__url__"]], sample["__key__"], image,
                                         sample[image] if image else None))
                    cls_at.append(sample.get(WDS_LABEL_KEY))
            except ValueError as exc:  # webdataset: a duplicate file name within one sample
                raise UserError(f"{shard}: not a valid webdataset shard ({exc.args[0]})") from exc
        if not self.samples:
            raise UserFileNotFoundError(f"no samples in the webdataset shards {source}")
        self.labels = self._read_labels(cls_at)
        self.classes = [str(c) for c in range(max(self.labels) + 1)] if any(cls_at) else ["all"]

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        # one open shard per worker process at a time: the stream order reads a shard to its end before the next
        if self._fh is None or self._fh[0] != shard:
            if self._fh is not None:
                self._fh[1].close()
            self._fh = (shard, open(self.shards[shard], "rb"))
        fh = self._fh[1]
        fh.seek(where[0])
        return fh.read(where[1])

    def _read_labels(self, cls_at: list[tuple[int, int] | None]) -> list[int]:
        if not any(cls_at):
            return [0] * len(self.samples)
        labels = []
        for (shard, key, _, _), where in zip(self.samples, cls_at):
            if where is None:
                raise UserError(f"{self.shards[shard]}: sample {key!r} has no .{WDS_LABEL_KEY} while others do; "
                                "give every sample a class label or none")
            text = self._read(shard, where).decode("utf-8", "replace").strip()
            if not (text.isascii() and text.isdigit()):
                raise UserError(f"{self.shards[shard]}: sample {key!r} has .{WDS_LABEL_KEY} = {text[:40]!r}; "
                                "expected a non-negative integer class index")
            labels.append(int(text))
        return labels

    def describe(self, i: int) -> str:
        shard, key, image, _ = self.samples[i]
        return f"{self.shards[shard]}:{key}.{image or '<no image>'}"

    def _open(self, i: int) -> Image.Image:
        shard, key, image, where = self.samples[i]
        if image is None:
            raise UserValueError(f"sample has no image member (one of .{', .'.join(WDS_IMAGE_KEYS[:5])}, …)")
        return _image_from_bytes(self._read(shard, where))


@functools.lru_cache(maxsize=None)
def _builtin_photo(name: str) -> np.ndarray:
    """The photograph as (H, W, 3) uint8, decoded once per process (every stage of a pipeline builds the data set
    again) and read-only, since it is shared."""
    import skimage.data  # lazy: scikit-image loads only for the built-in photographs

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo pairs: the left view
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    img.flags.writeable = False
    return img


class BuiltinPhotos(ImageDataset):
    """Random crops of the photographs bundled with scikit-image; class = photograph.

    Item ``i`` comes from photograph ``i mod P``; the crop's scale (an area fraction between 1/4 and
    1 of the short side squared) and position follow the item's seed, so the set is a deterministic
    function of its seeds. Always random-crops: that is what makes it a data set.
    """

    def __init__(self, image_size: int, length: int = 256, seed: int = 0, **kw) -> None:
        kw["random_crop"] = True
        super().__init__(image_size, **kw)
        self.photos = [_builtin_photo(n) for n in BUILTIN_PHOTOS]
        self.classes = list(BUILTIN_PHOTOS)
        self.labels = [i % len(self.photos) for i in range(length)]
        self.seed = seed

    def describe(self, i: int) -> str:
        return f"builtin:{BUILTIN_PHOTOS[self.labels[i]]}#{i}"

    def load(self, i: int, aug_seed: int | None = None) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng(aug_seed if aug_seed is not None else step_seed(self.seed, "builtin", i))
        photo = self.photos[self.labels[i]]
        h, w = photo.shape[:2]
        side = int(min(h, w) * np.sqrt(rng.uniform(0.25, 1.0)))
        side = max(side, min(h, w, self.image_size))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        img = Image.fromarray(photo[top : top + side, left : left + side])
        x = transform_image(img, self.image_size, resize=True, random_crop=False)
        if self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def build_dataset(
    source: str,
    *,
    path: str | None = None,
    split: str | None = None,
    image_size: int,
    resize: bool = True,
    random_crop: bool = False,
    random_flip: bool = False,
    max_images: int | None = None,
    builtin_crops: int = 256,
    seed: int = 0,
    max_unreadable_fraction: float = 1.0,
    unreadable_log: str | Path | None = None,
) -> ImageDataset:
    """Make the data set a recipe's ``[data]`` section describes; more than ``max_unreadable_fraction`` of its
    images proving unreadable stops the run (UserError), each one listed in ``unreadable_log``."""
    kw = dict(resize=resize, random_crop=random_crop, random_flip=random_flip)
    if source == "builtin":
        ds: ImageDataset = BuiltinPhotos(image_size, length=builtin_crops, seed=seed, **kw)
    elif source == "folder":
        ds = ImageFolder(path, image_size, **kw)
    elif source == "tar":
        ds = TarImages(path, image_size, split=split, **kw)
    elif source == "webdataset":
        ds = WebDatasetShards(path, image_size, **kw)
    else:
        raise UserValueError(f"unknown data.source {source!r}; choose builtin, folder, tar or webdataset")
    if max_images is not None and max_images < len(ds):
        # An even subsample keeps every class represented.
        keep = np.linspace(0, len(ds) - 1, max_images).round().astype(int)
        ds = Subset(ds, keep.tolist())
    ds.max_bad_fraction = max_unreadable_fraction
    ds.bad_log = Path(unreadable_log) if unreadable_log is not None else None
    return ds


SUBSET_RULES = ("stratified", "uniform", "first")


def subset_indices(labels, n: int, *, seed: int, rule: str = "stratified") -> np.ndarray:
    """Sorted indices of an ``n``-item subset of a labelled set, for statistics that must not depend on file order.

    ``stratified`` (default): every class keeps its share of ``n`` (largest remainder, ties broken in a seeded
    order), items drawn uniformly at random within each class with ``seed``; ``uniform``: ``n`` items drawn
    uniformly at random without replacement with ``seed``; ``first``: the first ``n`` items in the set's (sorted)
    order, which for class-sorted folders and tars is a few classes only. ``n >= len(labels)`` gives every item.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if rule not in SUBSET_RULES:
        raise UserValueError(f"unknown subset rule {rule!r}; choose one of {', '.join(SUBSET_RULES)}")
    if n >= total:
        return np.arange(total)
    if rule == "first":
        return np.arange(n)
    rng = np.random.default_rng(step_seed(seed, "subset", rule))
    if rule == "uniform":
        return np.sort(rng.choice(total, n, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / total
    take = np.floor(quota).astype(int)
    remainder = quota - take
    tie_break = rng.random(len(classes))  # equal remainders: seeded order, not the lowest class indices
    for k in np.lexsort((tie_break, -remainder))[: n - int(take.sum())]:
        take[k] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), t, replace=False) for c, t in zip(classes, take) if t]
    return np.sort(np.concatenate(picks))


def subset_record(labels, indices, *, seed: int, rule: str) -> dict:
    """What eval.json / manifests say about a subset: rule, seed, size, the set's size and classes covered."""
    labels = np.asarray(labels)
    picked = labels[np.asarray(indices, dtype=int)]
    return {"rule": rule if len(indices) < len(labels) else "all", "seed": seed if rule != "first" else None,
            "count": len(indices), "of": len(labels),
            "classes": len(np.unique(picked)), "classes_in_set": len(np.unique(labels))}


def take_subset(ds: ImageDataset, n: int | None, *, seed: int, rule: str = "stratified"):
    """``(dataset, record)``: ``ds`` itself when ``n`` is None or covers it, else a :class:`Subset` chosen by
    :func:`subset_indices`; ``record`` is :func:`subset_record`'s description of the choice."""
    n = len(ds) if n is None else min(n, len(ds))
    idx = subset_indices(ds.labels, n, seed=seed, rule=rule)
    record = subset_record(ds.labels, idx, seed=seed, rule=rule)
    return (ds if n == len(ds) else Subset(ds, idx.tolist())), record


class Subset(ImageDataset):
    """A fixed subset of another image data set (keeps labels and class names)."""

    def __init__(self, base: ImageDataset, indices: list[int]) -> None:
        super().__init__(base.image_size)
        self.base = base
        self.indices = indices
        self.labels = [base.labels[i] for i in indices]
        self.classes = base.classes
        self.streaming = base.streaming

    def describe(self, i: int) -> str:
        return self.base.describe(self.indices[i])

    def load(self, i: int, aug_seed: int | None = None) -> tuple[torch.Tensor, int]:
        return self.base.load(self.indices[i], aug_seed)


class StepSampler(Sampler):
    """Yields this rank's micro-batches of ``(index, aug_seed)`` from global micro-batch ``start`` on.

    The global stream is the concatenation of per-epoch permutations seeded by (seed, epoch); global
    micro-batch g covers stream positions [g·B·W, (g+1)·B·W), rank r taking its B-long slice.
    """

    def __init__(self, n: int, batch_per_rank: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True) -> None:
        self.n, self.b, self.seed = n, batch_per_rank, seed
        self.rank, self.world, self.start = rank, world_size, start
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(step_seed(self.seed, "perm", epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.start
        while True:
            base = (g * self.world + self.rank) * self.b
            yield [(self._index(p), step_seed(self.seed, "aug", p)) for p in range(base, base + self.b)]
            g += 1

    def __len__(self) -> int:  # an endless stream; DataLoader needs a number
        return 2**62


def batch_source(dataset: Dataset, *, batch_per_rank: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
    """``start_step -> iterator of micro-batches`` for :class:`ssr_cli.engine.TrainSpec`."""

    def batches(start_step: int) -> Iterator:
        sampler = StepSampler(len(dataset), batch_per_rank, seed=seed, rank=rank, world_size=world_size,
                              start=start_step * grad_accum, shuffle=not getattr(dataset, "streaming", False))
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        return iter(loader)

    return batches


def ordered_batches(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                    num_workers: int = 0, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deterministic pass over (a prefix of) the data set, strided over ranks, no augmentation.

    Yields (images, labels, indices)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, n, world_size))

    class _Indexed(Dataset):
        def __len__(self):
            return len(mine)

        def __getitem__(self, k):
            x, y = dataset[(mine[k], None)]
            return x, y, mine[k]

    loader = DataLoader(_Indexed(), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    yield from loader
