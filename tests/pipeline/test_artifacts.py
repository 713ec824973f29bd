"""Atomic outputs: a failed write leaves the old output intact and never a half-written one."""

from __future__ import annotations

import pytest

from tokenline.artifacts import atomic_dir, content_hash, read_manifest, write_manifest


def test_failed_stage_keeps_previous_output(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as temp:
        (temp / "a.txt").write_text("first")
        write_manifest(temp, stage="x")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as temp:
            (temp / "a.txt").write_text("second, half")
            raise RuntimeError("stage crashed")
    assert (final / "a.txt").read_text() == "first"
    assert read_manifest(final)["stage"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_folder_without_manifest_reads_as_absent(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"123")
    assert read_manifest(tmp_path) is None


def test_content_hash_tracks_names_and_bytes_not_manifest(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    before = content_hash(tmp_path)
    write_manifest(tmp_path, stage="x")
    assert content_hash(tmp_path) == before
    (tmp_path / "a").write_bytes(b"2")
    assert content_hash(tmp_path) != before
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "a").rename(tmp_path / "b")
    assert content_hash(tmp_path) != before
