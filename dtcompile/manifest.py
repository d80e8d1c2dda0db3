"""Manifest schema (JSON, never pickle), file hashing, artifact keys and verification.

Layout of an artifact folder ``engines/<name>/``::

    manifest.json
    pipeline/                      the diffusers pipeline without the engine-backed component
    onnx/transformer.onnx          the exported graph (also the onnxruntime artifact)
    <backend>/<arch>/transformer.engine
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dtcompile.core.digests import sha256_file, sha256_json
from dtcompile.core.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def artifact_key(engine_fields: dict[str, Any], source_sha256: str, versions: dict[str, Any]) -> str:
    """sha256 of everything that changes an engine: recipe fields, weights, tool versions."""
    payload = {"recipe": engine_fields, "source_sha256": source_sha256, "versions": versions}
    return sha256_json(payload)


def file_entry(artifact_dir: Path, path: Path) -> dict[str, Any]:
    """{file, sha256, size} for a file inside the artifact (path stored relative)."""
    return {
        "file": path.relative_to(artifact_dir).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }


def write_manifest(artifact_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json (sorted keys, indented) atomically."""
    path = artifact_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """Load and sanity-check an artifact's manifest; ArtifactError says what is wrong."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir}: artifact folder not found (build one with: dtc build --recipe ...)")
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not a dtc artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: manifest schema_version {version!r}, this dtc reads {SCHEMA_VERSION}; rebuild the artifact"
        )
    return manifest


def verify_file(artifact_dir: Path, entry: dict[str, Any], *, full: bool = True) -> Path:
    """Check a manifest file entry against the disk: exists, size, sha256 (when ``full``)."""
    path = Path(artifact_dir) / entry["file"]
    if not path.is_file():
        raise ArtifactError(f"{path}: file listed in the manifest is missing; rebuild or re-pull the artifact")
    size = path.stat().st_size
    if size != entry["size"]:
        raise ArtifactError(
            f"{path}: {size} bytes but the manifest says {entry['size']} (truncated or replaced); "
            "rebuild or re-pull the artifact"
        )
    if full and sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 does not match the manifest (file modified); rebuild or re-pull")
    return path


def common_file_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Files every arch needs: pipeline files, ONNX graphs and external data, weight maps, LoRA base weights."""
    out = list(manifest.get("pipeline", {}).get("files", []))
    base_store = (manifest.get("lora") or {}).get("base_store")
    if base_store:
        out.append(base_store)
    for comp in manifest.get("components", {}).values():
        onnx = comp.get("onnx")
        if onnx:
            out.append(onnx)
            out.extend(onnx.get("external_data", []))
        if comp.get("weight_map"):
            out.append(comp["weight_map"])
    return out


def engine_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every engine entry (onnxruntime's points at the ONNX graph, arch "any")."""
    return [e for comp in manifest.get("components", {}).values() for e in comp.get("engines", [])]


def all_file_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry a manifest lists."""
    return common_file_entries(manifest) + engine_entries(manifest)
