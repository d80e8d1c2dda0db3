"""Manifest helpers: deterministic keys, file verification and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtcompile.core.errors import ArtifactError
from dtcompile.core.versions import tool_versions
from dtcompile.manifest import (
    SCHEMA_VERSION,
    artifact_key,
    file_entry,
    read_manifest,
    verify_file,
    write_manifest,
)


def test_key_is_deterministic_and_sensitive() -> None:
    versions = tool_versions()
    fields = {"dtype": "float32", "engine": {"targets": ["sm_89"]}}
    key = artifact_key(fields, "ab" * 32, versions)
    assert key == artifact_key(json.loads(json.dumps(fields)), "ab" * 32, dict(reversed(versions.items())))
    assert key != artifact_key({**fields, "dtype": "float16"}, "ab" * 32, versions)
    assert key != artifact_key(fields, "cd" * 32, versions)
    assert key != artifact_key(fields, "ab" * 32, {**versions, "dtcompile_source": "0" * 16})
    assert len(versions["dtcompile_source"]) == 16


def test_write_is_sorted_and_round_trips(tmp_path: Path) -> None:
    m = {"schema_version": SCHEMA_VERSION, "z": 1, "a": {"y": 2, "b": 3}}
    write_manifest(tmp_path, m)
    text = (tmp_path / "manifest.json").read_text()
    assert text.index('"a"') < text.index('"z"') and read_manifest(tmp_path) == m
    write_manifest(tmp_path, dict(reversed(m.items())))
    assert (tmp_path / "manifest.json").read_text() == text


def test_verify_file_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "e" / "x.engine"
    path.parent.mkdir()
    path.write_bytes(b"engine bytes")
    entry = file_entry(tmp_path, path)
    assert entry["file"] == "e/x.engine" and verify_file(tmp_path, entry) == path
    path.write_bytes(b"engine bytez")  # same size, other content
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        verify_file(tmp_path, entry)
    verify_file(tmp_path, entry, full=False)  # the size-only check passes
    path.write_bytes(b"engine")
    with pytest.raises(ArtifactError, match="6 bytes but the manifest says 12"):
        verify_file(tmp_path, entry, full=False)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_file(tmp_path, entry)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema_version": 99}')
    with pytest.raises(ArtifactError, match="schema_version 99, this dtc reads 1; rebuild"):
        read_manifest(tmp_path)
