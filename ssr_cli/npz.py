"""``.npz`` image batches in bounded memory: the ADM hand-off format, read and written in chunks.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) opens ``arr_0.npy`` inside the zip,
reads the ``.npy`` header (format 1.0 or 2.0) and then streams the raw C-order bytes batch by batch; its
statistics come from ``np.load(path)["mu"]`` etc. when the file has ``mu``. Sample batches and reference
batches are therefore: ``arr_0`` uint8 (N, H, W, 3) (NHWC, values 0..255), optionally ``arr_1`` int64 labels,
and for references ``mu``/``sigma`` (pool_3, float64) and ``mu_s``/``sigma_s`` (spatial, float64).

:func:`iter_npz_batches` reads an array that way (never the whole array at once), and :class:`NpzWriter`
writes one image at a time into an uncompressed zip member whose header states the final shape, so a 50K
256² batch (9.8 GB) never sits in memory on either side.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ssr_cli.engine.atomic import commit, temp_path_for
from ssr_cli.errors import UserError, UserFileNotFoundError


class NpzError(UserError, ValueError):
    """An ``.npz`` file that does not hold what was expected (missing key, wrong dtype or layout)."""


@contextmanager
def _open_member(path: str | os.PathLike, key: str):
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"npz file not found: {path}")
    try:
        zf = zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile:
        raise NpzError(f"{path} is not an .npz (zip) file") from None
    with zf:
        if f"{key}.npy" not in zf.namelist():
            found = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "nothing"
            raise NpzError(f"{path}: missing {key} in npz file (it holds {found})")
        with zf.open(f"{key}.npy", "r") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise NpzError(f"{path}:{key}.npy has .npy format {version}; only 1.0 and 2.0 stream")
            if fortran or dtype.hasobject:
                raise NpzError(f"{path}:{key}.npy must be a C-order array of plain numbers, got "
                               f"{'Fortran order' if fortran else dtype}")
            yield fh, tuple(shape), dtype


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The array names in an ``.npz`` file (without reading any array)."""
    with zipfile.ZipFile(path, "r") as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz`` from its header only."""
    with _open_member(path, key) as (_, shape, dtype):
        return shape, dtype


def check_images(path, shape, dtype, key: str = "arr_0") -> None:
    """An image batch must be uint8 NHWC with 3 channels (what ADM's evaluator feeds its Inception)."""
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise NpzError(f"{path}: {key} must be uint8 NHWC images (N, H, W, 3), got {dtype} {shape}")


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 64,
                     images: bool = True) -> Iterator[np.ndarray]:
    """Yield ``key`` of an ``.npz`` in row batches of at most ``batch_size`` (each a fresh array), reading only
    that many rows at a time; ``images`` checks the uint8 NHWC layout first."""
    with _open_member(path, key) as (fh, shape, dtype):
        if images:
            check_images(path, shape, dtype, key)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        left = shape[0]
        while left > 0:
            n = min(batch_size, left)
            data = fh.read(n * row)
            if len(data) != n * row:
                raise NpzError(f"{path}:{key}.npy is truncated ({shape[0] - left + len(data) // max(row, 1)} of "
                               f"{shape[0]} rows readable)")
            yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:])).copy()
            left -= n


class NpzWriter:
    """Write an ``.npz`` in the ADM layout one row at a time, atomically (a temp file renamed at the end).

    ``add_stream(key, shape, dtype)`` opens a streamed array whose rows come through ``write(key, rows)``;
    ``add(key, array)`` stores a small array whole. Members are uncompressed (as ``np.savez``), headers
    are ``.npy`` 1.0 (2.0 when needed), so ``np.load`` and ADM's streaming reader both read the file.
    Use as a context manager; leaving it with an exception removes the temp file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path_for(self.path)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._open: dict[str, list] = {}  # key -> [handle, rows expected, rows written, row shape, dtype]

    def _member(self, key: str, shape: tuple[int, ...], dtype: np.dtype):
        self._close_streams()  # a zip file writes one member at a time
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        fh = self._zip.open(f"{key}.npy", "w", force_zip64=True)
        try:
            np.lib.format.write_array_header_1_0(fh, header)
        except ValueError:  # header too long for 1.0
            np.lib.format.write_array_header_2_0(fh, header)
        return fh

    def add_stream(self, key: str, shape: tuple[int, ...], dtype) -> None:
        dtype = np.dtype(dtype)
        self._open[key] = [self._member(key, shape, dtype), shape[0], 0, tuple(shape[1:]), dtype]

    def write(self, key: str, rows: np.ndarray) -> None:
        fh, expected, written, row_shape, dtype = self._open[key]
        rows = np.ascontiguousarray(rows, dtype=dtype)
        if rows.shape[1:] != row_shape:
            raise NpzError(f"{self.path}: rows of {key} must be {row_shape}, got {rows.shape[1:]}")
        if written + rows.shape[0] > expected:
            raise NpzError(f"{self.path}: more than the {expected} rows announced for {key}")
        fh.write(rows.tobytes())
        self._open[key][2] = written + rows.shape[0]

    def add(self, key: str, array) -> None:
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        with self._member(key, array.shape, array.dtype) as fh:
            fh.write(array.tobytes())

    def _close_streams(self) -> None:
        for key, (fh, expected, written, _, _) in list(self._open.items()):
            fh.close()
            del self._open[key]
            if written != expected:
                raise NpzError(f"{self.path}: {key} got {written} rows, {expected} announced")

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        ok = False
        try:
            if exc_type is None:
                self._close_streams()
                ok = True
        finally:
            for fh, *_ in self._open.values():
                fh.close()
            self._zip.close()
            if ok:
                commit(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
        return False
