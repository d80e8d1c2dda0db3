"""Manifest helpers: deterministic keys, file verification and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtcompile.core.errors import ArtifactError
from dtcompile.core.versions import tool_versions
from dtcompile.manifest import (
    SCHEMA_VERSION,
    EngineEntry,
    Manifest,
    artifact_key,
    file_entry,
    read_manifest,
    verify_file,
    write_manifest,
)


def _manifest(**extra: object) -> dict:
    """A minimal valid manifest: one component with an onnxruntime engine and a cache-split part."""
    onnx = {"file": "onnx/t.onnx", "sha256": "ab" * 32, "size": 10, "external_data": []}
    engine = {"backend": "onnxruntime", "arch": "any", "file": "onnx/t.onnx", "sha256": "ab" * 32, "size": 10}
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny",
        "key": "cd" * 32,
        "dtype": "float32",
        "source": {"model": "builtin:tiny", "revision": None, "pipeline_class": "FluxPipeline"},
        "recipe": {"name": "tiny", "quant": None, "anything": {"free": ["form", 1.0]}},
        "components": {
            "transformer": {"onnx": onnx, "engines": [engine], "config": {"out_channels": None}, "parts": ["p0"]},
            "p0": {"part_of": "transformer", "kind": "prologue", "engines": []},
        },
        "stages": [{"name": "load", "wall_s": 5, "peak_rss_mb": 1.5, "wrote": []}],
        "skipped": [],
        **extra,
    }


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
    m = _manifest()
    write_manifest(tmp_path, m)
    text = (tmp_path / "manifest.json").read_text()
    assert text.index('"components"') < text.index('"stages"') and read_manifest(tmp_path).to_json() == m
    write_manifest(tmp_path, dict(reversed(m.items())))
    assert (tmp_path / "manifest.json").read_text() == text
    assert text == json.dumps(m, indent=2, sort_keys=True) + "\n"  # exactly what json.dumps of the dict writes


def test_round_trip_write_read_write_is_byte_identical(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest())
    first = (tmp_path / "manifest.json").read_bytes()
    write_manifest(tmp_path, read_manifest(tmp_path))
    assert (tmp_path / "manifest.json").read_bytes() == first
    assert b'"wall_s": 5,' in first and b'"revision": null' in first  # ints stay ints, nulls as written


def test_helpers_replace_string_keys(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest())
    m = read_manifest(tmp_path)
    assert isinstance(m, Manifest) and m.component_names() == ["transformer"] and m.main_component() == "transformer"
    assert m.components["p0"].is_part and m.components["transformer"].is_split
    assert all(isinstance(e, EngineEntry) for e in m.engine_entries()) and len(m.engine_entries()) == 1
    assert [e.file for e in m.common_file_entries()] == ["onnx/t.onnx"]
    assert [e.file for e in m.all_file_entries()] == ["onnx/t.onnx", "onnx/t.onnx"]
    assert m.recipe["anything"] == {"free": ["form", 1.0]}  # free-form sections are kept as written


def test_wrong_type_names_the_field_in_one_line(tmp_path: Path) -> None:
    m = _manifest()
    m["components"]["transformer"]["engines"][0]["size"] = "10"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as exc:
        read_manifest(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'manifest.json'}: ")
    assert "components.transformer.engines[0].size: expected a valid integer, got '10'" in msg
    m = _manifest()
    m["components"]["transformer"]["engines"][0]["sizee"] = 10
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"components\.transformer\.engines\[0\]\.sizee: unknown field"):
        read_manifest(tmp_path)
    m = _manifest()
    del m["source"]["pipeline_class"]
    with pytest.raises(ArtifactError, match=r"source\.pipeline_class: Field required"):
        write_manifest(tmp_path, m)  # writers are checked too


def test_newer_schema_version_says_upgrade(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(ArtifactError, match="built by a newer dtcompile: upgrade dtcompile") as exc:
        read_manifest(tmp_path)
    assert "\n" not in str(exc.value)


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
    (tmp_path / "manifest.json").write_text('{"schema_version": 0}')
    with pytest.raises(ArtifactError, match="schema_version 0, this dtc reads 1; rebuild"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="schema_version None, this dtc reads 1; rebuild"):
        read_manifest(tmp_path)


def test_component_entries_are_read_as_their_kind(tmp_path: Path) -> None:
    """A denoiser, a cache part and an aux entry each read as their own model; a field of another kind is one
    line naming it, and asking for the wrong kind is an ArtifactError."""
    from dtcompile.manifest import AuxEntry, DenoiserEntry, PartEntry, validate_manifest

    te = {"role": "text_encoder", "attr": "text_encoder_2", "engines": []}
    m = validate_manifest(_manifest(components={**_manifest()["components"], "text_encoder_2": te}))
    kinds = {name: type(entry) for name, entry in m.components.items()}
    assert kinds == {"transformer": DenoiserEntry, "p0": PartEntry, "text_encoder_2": AuxEntry}
    assert m.denoiser("transformer").parts == ["p0"] and m.part("p0").part_of == "transformer"
    assert m.aux_names() == ["text_encoder_2"] and m.denoiser_names() == ["transformer"]
    with pytest.raises(ArtifactError, match=r"components\.p0 is a part entry, not a denoiser one"):
        m.denoiser("p0")
    bad = _manifest()
    bad["components"]["p0"]["role"] = "vae_decoder"  # a part carrying an aux field
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"components\.p0\.role: unknown field") as exc:
        read_manifest(tmp_path)
    assert "\n" not in str(exc.value)
    bad = _manifest()
    del bad["components"]["p0"]["kind"]
    with pytest.raises(ArtifactError, match=r"components\.p0\.kind: Field required"):
        validate_manifest(bad)
