"""The atomic-write helper: complete file or untouched target, never a leftover temporary file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssr_cli.engine.atomic import atomic_path, atomic_write, temp_path_for, write_json_atomic, write_text_atomic


def test_writes_create_folder_and_leave_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    assert write_json_atomic(target, {"k": [1, 2]}, indent=2) == target
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    assert target.read_text() == json.dumps({"k": [1, 2]}, indent=2)
    write_text_atomic(target, "replaced")
    assert target.read_text() == "replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_temporary_keeps_the_extension_so_format_sniffing_writers_work(tmp_path):
    target = tmp_path / "A.npy"
    tmp = temp_path_for(target)
    assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp.name.startswith(".")
    with atomic_path(target) as tmp:
        np.save(tmp, np.arange(3.0))  # np.save appends .npy to a name without it
    np.testing.assert_array_equal(np.load(target), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.npy"]
