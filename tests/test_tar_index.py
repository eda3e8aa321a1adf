"""`data.tar_file_members` reads a tar's headers itself (fast); whatever the archive, it must list exactly what the
standard library's `tarfile` lists: the name, data offset and size of every regular file, in order."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ssr_cli.data import TarImages, _pax_keys, tar_file_members


def _tarfile_truth(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write(path: Path, fmt: int, names: list[str], pax_headers: dict | None = None) -> Path:
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tf:
        for k, name in enumerate(names):
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif name.startswith("link:"):
                info = tarfile.TarInfo(name[5:])
                info.type, info.linkname = tarfile.SYMTYPE, "a/x.png"
                tf.addfile(info)
            else:
                _add_file(tf, name, bytes([k % 251]) * (k * 700 % 2049))  # sizes on and off the 512 blocks
    return path


PLAIN = ["a/", "a/x.png", "a/empty.jpg", "link:a/y.png", "b/" + "d" * 90 + "/z.png",  # > 100 chars: ustar prefix
         "b/w.txt"] + [f"c/{k}.jpg" for k in range(20)]


@pytest.mark.parametrize("fmt, names, pax", [
    (tarfile.USTAR_FORMAT, PLAIN, None),
    (tarfile.GNU_FORMAT, PLAIN, None),
    (tarfile.GNU_FORMAT, PLAIN + ["e/" + "n" * 150 + ".png"], None),  # a GNU long-name record: tarfile's way
    (tarfile.PAX_FORMAT, PLAIN, {"comment": "made by git archive"}),  # a harmless global header: read past it
    (tarfile.PAX_FORMAT, PLAIN, {"path": "elsewhere"}),  # a global header that matters: tarfile's way
    (tarfile.PAX_FORMAT, PLAIN + ["é/ü.png", "f/" + "p" * 300 + ".png"], None),  # per-member pax records
])
def test_members_equal_the_tarfile_listing(tmp_path, fmt, names, pax):
    path = _write(tmp_path / "t.tar", fmt, names, pax)
    truth = _tarfile_truth(path)
    assert len(truth) >= 20
    assert tar_file_members(path) == truth


def test_a_damaged_header_is_left_to_tarfile(tmp_path):
    path = _write(tmp_path / "t.tar", tarfile.USTAR_FORMAT, PLAIN)
    data = bytearray(path.read_bytes())
    data[148:156] = b"0000000\0"  # the first header's checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(tarfile.TarError):  # tarfile's own verdict on this archive, not a silent wrong listing
        _tarfile_truth(path)
    with pytest.raises(tarfile.TarError):
        tar_file_members(path)


def test_a_truncated_archive_is_left_to_tarfile(tmp_path):
    path = _write(tmp_path / "t.tar", tarfile.USTAR_FORMAT, PLAIN)
    data = path.read_bytes()
    last = tar_file_members(path)[-1]
    path.write_bytes(data[: last[1] + 100])  # the last member's data cut short, no end-of-archive blocks
    with pytest.raises(tarfile.TarError):
        _tarfile_truth(path)
    with pytest.raises(tarfile.TarError):
        tar_file_members(path)


def test_pax_keys_parses_records_and_flags_garbage():
    assert _pax_keys(b"20 comment=abcdefgh\n12 uid=1000\n") == {"comment", "uid"}
    assert _pax_keys(b"xx garbage") == {"?"}


def test_cifar_tars_list_as_tarfile_lists_them(shared_data):
    for name in ("test_10000.tar",):  # the 50,000-image train tar: the same format, 2.5 s more through tarfile
        path = shared_data / "cifar10" / name
        assert tar_file_members(path) == _tarfile_truth(path)


def test_tar_images_reads_the_images_by_offset(tmp_path):
    from PIL import Image

    path = tmp_path / "imgs.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tf:
        for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
            _add_file(tf, f"{cls}/0.png", buf.getvalue())
    ds = TarImages(path, image_size=8)
    assert ds.classes == ["blue", "red"]
    x, label = ds[(ds.labels.index(1), None)]
    assert label == 1 and x[0].min() > 0.99 and x[2].max() < -0.99  # red in [-1, 1]


def test_the_listing_kept_per_process_follows_the_file(tmp_path):
    """The listing is kept for the file as it is: a second call gives an equal list (a copy: changing it changes
    nothing kept), and the file rewritten with other members is listed anew."""
    path = _write(tmp_path / "t.tar", tarfile.USTAR_FORMAT, PLAIN)
    first = tar_file_members(path)
    first.clear()
    assert tar_file_members(path) == _tarfile_truth(path) != []
    _write(path, tarfile.USTAR_FORMAT, PLAIN[:4])
    assert tar_file_members(path) == _tarfile_truth(path) and len(_tarfile_truth(path)) < 20


def test_tar_images_names_classes_as_paths_do(tmp_path):
    """Members named with "./" or doubled slashes get the classes their paths have."""
    from PIL import Image

    path = tmp_path / "imgs.tar"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buf, format="PNG")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("./train/cat/0.png", "train//dog/1.png", "train/2.png"):
            _add_file(tf, name, buf.getvalue())
    ds = TarImages(path, image_size=8, split="train")
    assert ds.classes == ["all", "cat", "dog"] and sorted(ds.labels) == [0, 1, 2]
