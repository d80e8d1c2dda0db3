"""The typed manifest (JSON, never pickle): models, read/write in one place, file hashing, artifact keys.

Layout of an artifact folder ``engines/<name>/``::

    manifest.json
    pipeline/                      the diffusers pipeline without the engine-backed component
    onnx/transformer.onnx          the exported graph (also the onnxruntime artifact)
    <backend>/<arch>/transformer.engine

The models mirror the JSON that builds write, field for field: structural models forbid unknown fields (a
hand-edited manifest fails with one line naming the dotted field path), free-form sections (recipe, component
config, quant reports, attention records) allow anything. Writing dumps only the fields that were set, so
``read_manifest`` -> ``write_manifest`` reproduces the file byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from dtcompile.core.digests import sha256_file, sha256_json, sha256_text
from dtcompile.core.errors import ArtifactError
from dtcompile.core.files import PICKLE_SUFFIXES, cache_root, recover_swap, write_text_atomic
from dtcompile.core.targets import REFERENCE_BACKEND

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

#: A model's precision, as recipes name it (``recipe.schema``): anything else (``complex128``) is refused on read.
ModelDtype = Literal["float32", "float16", "bfloat16"]
Num = int | float  # kept as written (a float field would turn 5 into 5.0 and change the bytes)


class _Strict(BaseModel):
    """A structural part of the manifest: exact types, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def to_json(self) -> dict[str, Any]:
        """The plain JSON dict, exactly the fields that were set."""
        return self.model_dump(mode="json", exclude_unset=True)


class _Open(_Strict):
    """A free-form part of the manifest: the typed fields are checked, anything else is kept as is."""

    model_config = ConfigDict(extra="allow", strict=True)


def _inside(value: str) -> str:
    """A manifest path must name a file inside the artifact folder: relative, '/'-separated, no '..'."""
    parts = value.split("/")
    if (
        not value
        or "\\" in value
        or "\x00" in value
        or value.startswith("/")
        or (len(value) > 1 and value[1] == ":")
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError("must be a relative path inside the artifact folder ('/'-separated, no '..' or '.')")
    if value.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"is a pickle-format file ({', '.join(PICKLE_SUFFIXES)}); artifacts carry safetensors only")
    return value


#: A path read from a manifest: it stays inside the artifact folder (checked on every read and write).
RelPath = Annotated[str, AfterValidator(_inside)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class FileEntry(_Strict):
    """A file of the artifact: path relative to the artifact folder, sha256 and size in bytes."""

    file: RelPath
    sha256: Sha256
    size: int = Field(ge=0)


class OnnxEntry(FileEntry):
    """The exported graph and its external-data files."""

    external_data: list[FileEntry] = Field(default_factory=list)


class WeightMapEntry(FileEntry):
    """The torch parameter -> ONNX initializer map of a component, with its per-status parameter counts."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, int] = Field(init=False)  # ambiguous, unmapped, ...: counts only

    mapped: int | None = None


class TensorSpec(_Strict):
    """A graph input or output: name, dtype and dims (ints or symbolic names)."""

    name: str
    dtype: str
    dims: list[int | str]


class EngineEntry(_Strict):
    """One runnable engine: onnxruntime's points at the ONNX graph (arch "any"); TensorRT ones add build facts."""

    backend: str
    arch: str
    file: RelPath
    sha256: Sha256
    size: int = Field(ge=0)
    trt_version: str | None = None
    refittable: bool | None = None
    strongly_typed: bool | None = None
    opt_level: int | None = None
    profile: dict[str, Any] | None = None
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    plugins: list[dict[str, Any]] | None = None
    build_s: Num | None = None
    weight_streaming: bool | None = None  # built streamable (BuilderFlag.WEIGHT_STREAMING); docs/memory.md
    weights_size: int | None = Field(default=None, ge=0)  # bytes of the graph's weights (initializers)
    device_memory_size: int | None = Field(default=None, ge=0)  # activation workspace, where a GPU build recorded it

    @model_validator(mode="after")
    def _file_matches_target(self) -> EngineEntry:
        # builds write `<backend>/<arch>/<component>.engine` (and onnxruntime runs the graph on any arch): an entry
        # whose labels disagree with its file had them edited (arch labels swapped between engines)
        if self.backend == REFERENCE_BACKEND:
            if self.arch != "any":
                raise ValueError(f"an onnxruntime engine runs on arch 'any', not {self.arch!r}")
        elif not self.file.startswith(f"{self.backend}/{self.arch}/"):
            raise ValueError(
                f"the {self.backend} {self.arch} engine must be a file under {self.backend}/{self.arch}/, not "
                f"{self.file!r} (its backend or arch label was edited)"
            )
        return self

    @property
    def target(self) -> str:
        """``backend:arch``."""
        return f"{self.backend}:{self.arch}"

    def file_entry(self) -> FileEntry:
        """The engine as a plain file entry."""
        return FileEntry(file=self.file, sha256=self.sha256, size=self.size)


class ComponentEntry(_Strict):
    """What every exported component has; a manifest holds one of its three kinds per name: ``DenoiserEntry``,
    ``PartEntry`` (one part of a cache-split denoiser) or ``AuxEntry`` (a text encoder or VAE decoder)."""

    onnx: OnnxEntry | None = None
    engines: list[EngineEntry] = Field(default_factory=list)
    config: dict[str, Any] | None = None
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    profile: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    quant: dict[str, Any] | None = None
    weight_map: WeightMapEntry | None = None
    opset: int | None = None
    n_nodes: int | None = None
    dtype: ModelDtype | None = None  # the graph's precision where it differs from the manifest's

    @property
    def is_part(self) -> bool:
        """A part of a split component (not run on its own)."""
        return isinstance(self, PartEntry)

    @property
    def is_aux(self) -> bool:
        """A text encoder or VAE decoder standing in next to the denoiser."""
        return isinstance(self, AuxEntry)

    @property
    def is_split(self) -> bool:
        """A denoiser split into block parts (runs through the block-cache runtime)."""
        return isinstance(self, DenoiserEntry) and self.parts is not None

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return [t.name for t in self.inputs or []]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return [t.name for t in self.outputs or []]

    def output_name(self) -> str:
        """The first graph output's name."""
        if not self.outputs:
            raise ArtifactError("component lists no outputs; rebuild the artifact")
        return self.outputs[0].name


class DenoiserEntry(ComponentEntry):
    """A denoiser (the main one, or a further expert such as Wan2.2's ``transformer_2``); in a block-cache build
    it has no graph of its own: ``parts`` lists its parts in execution order and ``cache`` the cache layout."""

    parts: list[str] | None = None
    cache: dict[str, Any] | None = None


class PartEntry(ComponentEntry):
    """One part of a cache-split denoiser: ``part_of`` names it; ``kind`` is prologue, blocks or epilogue."""

    part_of: str
    kind: str
    blocks: list[Any] | None = None
    segment: dict[str, Any] | None = None


class AuxEntry(ComponentEntry):
    """An engine-backed text encoder or VAE decoder: ``role`` picks its stand-in, ``attr`` the pipeline attribute
    it replaces."""

    role: Literal["text_encoder", "vae_decoder", "vae_encoder", "image_encoder"]
    attr: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")] | None = None
    tile: dict[str, Any] | None = None  # a tiled VAE decoder: core.tiles.TileSpec.to_json()


def _component_kind(value: Any) -> str:
    """The kind of a component entry: ``part_of`` makes a part, ``role`` an aux, anything else a denoiser."""
    if isinstance(value, ComponentEntry):
        return "part" if isinstance(value, PartEntry) else "aux" if isinstance(value, AuxEntry) else "denoiser"
    if isinstance(value, dict):
        return "part" if "part_of" in value else "aux" if "role" in value else "denoiser"
    return "denoiser"  # not an object: the denoiser model reports it


AnyComponent = Annotated[
    Annotated[DenoiserEntry, Tag("denoiser")] | Annotated[PartEntry, Tag("part")] | Annotated[AuxEntry, Tag("aux")],
    Discriminator(_component_kind),
]


class SourceEntry(_Strict):
    """Where the weights came from."""

    model: str
    revision: str | None = None
    kind: str | None = None
    pipeline_class: str
    component_sha256: str | None = None


class ShapeRange(_Strict):
    """One export shape range."""

    min: int
    opt: int
    max: int


class PipelineEntry(_Strict):
    """The saved diffusers pipeline (empty when built with output.include_pipeline: false)."""

    dir: RelPath | None = None
    files: list[FileEntry] = Field(default_factory=list)


class SkippedTarget(_Strict):
    """A target that was not built, and why."""

    backend: str
    arch: str
    reason: str
    component: str | None = None  # set when an artifact with several denoisers dropped one denoiser's engine


class StageRecord(_Open):
    """What one build stage took."""

    name: str
    wall_s: Num | None = None
    peak_rss_mb: Num | None = None
    wrote: list[str] = Field(default_factory=list)


class LoraState(_Open):
    """One denoiser's LoRA state for ``dtc refit``: the parameters ever touched and their stored base weights."""

    touched: list[str] = Field(default_factory=list)
    base_store: FileEntry | None = None


class LoraSection(_Open):
    """Fused LoRA adapters and, for ``dtc refit``, the main denoiser's stored base weights; other denoisers
    (Wan2.2's ``transformer_2``) have theirs under ``components``."""

    adapters: list[dict[str, Any]] = Field(default_factory=list)
    base_store: FileEntry | None = None
    components: dict[str, LoraState] = Field(default_factory=dict)


class Manifest(_Strict):
    """``manifest.json`` of an artifact."""

    schema_version: int
    name: str
    key: str
    recipe: dict[str, Any] | None = None
    recipe_file: str | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    source: SourceEntry
    dtype: ModelDtype
    precision: str | None = None
    shapes: dict[str, ShapeRange] = Field(default_factory=dict)
    components: dict[str, AnyComponent] = Field(default_factory=dict)
    pipeline: PipelineEntry | None = None
    skipped: list[SkippedTarget] = Field(default_factory=list)
    stages: list[StageRecord] = Field(default_factory=list)
    lora: LoraSection | None = None
    stopped_after: str | None = None
    pulled: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _has_components(self) -> Manifest:
        if not self.components and self.stopped_after is None:
            raise ValueError("components: none listed; a finished build lists its engine components")
        return self

    @model_validator(mode="after")
    def _shapes_match_the_recipe(self) -> Manifest:
        # the engines were built for the recipe's shape ranges: a `shapes` edited on its own (height.max raised)
        # would let a run through to an engine that cannot take it
        built = ((self.recipe or {}).get("export") or {}).get("shapes") if isinstance(self.recipe, dict) else None
        if not isinstance(built, dict):
            return self
        for name, r in self.shapes.items():
            want = built.get(name)
            if isinstance(want, int) and not isinstance(want, bool):
                want = {"min": want, "opt": want, "max": want}
            if isinstance(want, dict) and [want.get(k) for k in ("min", "opt", "max")] != [r.min, r.opt, r.max]:
                raise ValueError(
                    f"shapes.{name}: {r.min}/{r.opt}/{r.max} (min/opt/max) differs from the range the engines were "
                    f"built for, recipe.export.shapes.{name} {want.get('min')}/{want.get('opt')}/{want.get('max')}"
                )
        return self

    def component_names(self) -> list[str]:
        """Components that run on their own (not ``part_of`` another), in manifest order."""
        return [name for name, comp in self.components.items() if not comp.is_part]

    def aux_names(self) -> list[str]:
        """The engine-backed text encoders and VAE decoder (``ComponentEntry.role``), in manifest order."""
        return [name for name, comp in self.components.items() if comp.is_aux]

    def denoiser_names(self) -> list[str]:
        """The denoiser engines (every component that is neither a part nor an aux), the main one first."""
        return [n for n in self.component_names() if not self.components[n].is_aux]

    def main_component(self) -> str:
        """The denoiser: the engine-backed component LoRA, quant, cache and refit apply to."""
        names = self.denoiser_names()
        if not names:
            raise ArtifactError(f"artifact {self.name} lists no components (stopped after {self.stopped_after!r})")
        return names[0]

    def component(self, name: str) -> DenoiserEntry | PartEntry | AuxEntry:
        """A component (or part) entry by name; ArtifactError names the ones there are."""
        try:
            return self.components[name]
        except KeyError:
            have = ", ".join(self.components) or "none"
            raise ArtifactError(f"artifact {self.name} has no component {name!r} (it has: {have})") from None

    def denoiser(self, name: str) -> DenoiserEntry:
        """A denoiser's entry by name; ArtifactError when ``name`` is another kind."""
        return _of_kind(self, name, DenoiserEntry)

    def part(self, name: str) -> PartEntry:
        """A cache part's entry by name; ArtifactError when ``name`` is another kind."""
        return _of_kind(self, name, PartEntry)

    def aux(self, name: str) -> AuxEntry:
        """A text encoder's or VAE decoder's entry by name; ArtifactError when ``name`` is another kind."""
        return _of_kind(self, name, AuxEntry)

    def engine_entries(self) -> list[EngineEntry]:
        """Every engine entry (onnxruntime's points at the ONNX graph, arch "any")."""
        return [e for comp in self.components.values() for e in comp.engines]

    def common_file_entries(self) -> list[FileEntry]:
        """Files every arch needs: pipeline files, ONNX graphs and external data, weight maps, LoRA base weights."""
        out = list(self.pipeline.files) if self.pipeline else []
        if self.lora is not None:
            stores = [self.lora.base_store, *(c.base_store for c in self.lora.components.values())]
            out.extend(store for store in stores if store is not None)
        for comp in self.components.values():
            if comp.onnx:
                out.append(comp.onnx)
                out.extend(comp.onnx.external_data)
            if comp.weight_map:
                out.append(comp.weight_map)
        return out

    def all_file_entries(self) -> list[FileEntry | EngineEntry]:
        """Every file entry the manifest lists."""
        return [*self.common_file_entries(), *self.engine_entries()]

    def to_text(self) -> str:
        """The manifest.json text: sorted keys, indent 2, only the fields that were set."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


_Kind = TypeVar("_Kind", DenoiserEntry, PartEntry, AuxEntry)


def _of_kind(manifest: Manifest, name: str, kind: type[_Kind]) -> _Kind:
    entry = manifest.component(name)
    if not isinstance(entry, kind):
        raise ArtifactError(
            f"{MANIFEST}: components.{name} is a {_component_kind(entry)} entry, not a {_component_kind(kind)} "
            "one; fix the file or rebuild the artifact"
        )
    return entry


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


def _dotted(loc: tuple[Any, ...], data: Any) -> str:
    """``components.transformer.engines[0].size`` for a pydantic error location (union branch tags dropped)."""
    out = ""
    for item in loc:
        if isinstance(data, dict) and item in data:
            data = data[item]
            out += f".{item}" if out else str(item)
        elif isinstance(data, list) and isinstance(item, int) and 0 <= item < len(data):
            data = data[item]
            out += f"[{item}]"
        elif isinstance(data, dict) and isinstance(item, str) and item is loc[-1]:
            out += f".{item}" if out else item  # a missing field
    return out or "(top level)"


def _one_line(exc: ValidationError, data: Any, where: str) -> str:
    errors = exc.errors(include_url=False)
    err = errors[0]
    paths = {_dotted(tuple(e["loc"]), data) for e in errors}  # a union reports each branch: count fields
    msg = err["msg"].replace("Input should be", "expected").removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] not in ("missing", "value_error"):  # a validator's own message names the value
        msg += f", got {err['input']!r:.60}"
    more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
    loc = f"{_dotted(tuple(err['loc']), data)}: " if err["loc"] else ""
    return f"{where}: {loc}{msg}{more}; fix the file or rebuild the artifact"


def validate_manifest(data: Manifest | dict[str, Any], where: str = MANIFEST) -> Manifest:
    """The typed manifest of ``data``; ArtifactError (one line: file, dotted field path, what is wrong)."""
    if isinstance(data, Manifest):
        data = data.to_json()  # re-checked: attribute assignment is not validated
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: manifest schema_version {version}, this dtc reads {SCHEMA_VERSION}; "
            "the artifact was built by a newer dtcompile: upgrade dtcompile (pip install -U dtcompile)"
        )
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: manifest schema_version {version!r}, this dtc reads {SCHEMA_VERSION}; rebuild the artifact"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(_one_line(exc, data, where)) from None


def write_manifest(artifact_dir: Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Validate, then write manifest.json (sorted keys, indented) atomically."""
    path = Path(artifact_dir) / MANIFEST
    text = validate_manifest(manifest, str(path)).to_text()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_manifest(artifact_dir: Path) -> Manifest:
    """Load and validate an artifact's manifest; ArtifactError says what is wrong."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir() and not artifact_dir.is_symlink():
        restored = recover_swap(artifact_dir)  # a swap killed between its two renames left only `.<name>.old-<pid>`
        if restored:
            import logging

            logging.getLogger("dtcompile.manifest").warning("%s", restored)
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir}: artifact folder not found (build one with: dtc build --recipe ...)")
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not a dtc artifact folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from None
    return validate_manifest(data, str(path))


def _entry_fields(entry: FileEntry | EngineEntry | dict[str, Any]) -> tuple[str, int, str]:
    if isinstance(entry, dict):
        return entry["file"], entry["size"], entry["sha256"]
    return entry.file, entry.size, entry.sha256


def artifact_path(artifact_dir: Path, rel: str) -> Path:
    """``artifact_dir / rel``, refused (ArtifactError) unless it resolves inside the artifact folder.

    ``rel`` comes from a manifest: absolute paths, ``..`` and links that lead out of the folder are refused.
    """
    _inside_or_raise(rel)
    root = Path(artifact_dir).resolve()
    path = Path(artifact_dir) / rel
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(
            f"{path}: resolves outside the artifact folder {root} (a link out of it); refusing to read it: "
            "rebuild or re-pull the artifact"
        )
    return path


def _inside_or_raise(rel: str) -> None:
    try:
        _inside(rel)
    except ValueError as exc:
        raise ArtifactError(f"manifest path {rel!r}: {exc}; fix the file or rebuild the artifact") from None


def verify_file(artifact_dir: Path, entry: FileEntry | EngineEntry | dict[str, Any], *, full: bool = True) -> Path:
    """Check a manifest file entry against the disk: inside the folder, exists, size, sha256 (when ``full``)."""
    rel, want_size, want_sha = _entry_fields(entry)
    path = artifact_path(artifact_dir, rel)
    if not path.is_file():
        raise ArtifactError(f"{path}: file listed in the manifest is missing; rebuild or re-pull the artifact")
    size = path.stat().st_size
    if size != want_size:
        raise ArtifactError(
            f"{path}: {size} bytes but the manifest says {want_size} (truncated or replaced); "
            "rebuild or re-pull the artifact"
        )
    if full and sha256_file(path) != want_sha:
        raise ArtifactError(f"{path}: sha256 does not match the manifest (file modified); rebuild or re-pull")
    return path


#: How much of a file a run checks: ``full`` hashes it; ``recorded`` hashes it only when its stat differs from
#: the record of its last full check (constant time otherwise); ``size`` checks only the size.
VERIFY_MODES = ("recorded", "full", "size")


def verify_mode(verify: bool | str) -> str:
    """``True`` -> "recorded", ``False`` -> "size", or one of ``VERIFY_MODES``."""
    mode = {True: "recorded", False: "size"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in VERIFY_MODES:
        raise ArtifactError(f"verify: expected one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    return mode


class Verifier:
    """Checks an artifact's files against its manifest, remembering what it hashed.

    Records live in dtcompile's cache (``$DTC_CACHE_DIR/verified/<hash of the folder's path>.json``), not in
    the artifact: whoever can write the artifact folder cannot also vouch for it. A record holds the sha256 a
    file had when it was hashed and its stat (size, mtime, ctime, inode, device). In ``recorded`` mode a file
    whose stat still matches is not hashed again; any other file is hashed (and refused if it differs).
    """

    def __init__(self, artifact_dir: Path, mode: bool | str = "recorded") -> None:
        self.artifact_dir = Path(artifact_dir)
        self.mode = verify_mode(mode)
        self.path = cache_root() / "verified" / f"{sha256_text(str(self.artifact_dir.resolve()))[:32]}.json"
        self.records: dict[str, Any] = {}
        self._changed = False  # save() writes only when a check added or refreshed a record
        self.hashed: list[str] = []
        self.trusted: list[str] = []
        try:
            loaded = json.loads(self.path.read_text())
            self.records = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass  # no record (or an unreadable one): everything is hashed

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def check(self, entry: FileEntry | EngineEntry | dict[str, Any]) -> Path:
        """The file's path once it matches ``entry`` (ArtifactError otherwise)."""
        rel, want_size, want_sha = _entry_fields(entry)
        path = verify_file(self.artifact_dir, entry, full=False)
        if self.mode == "size":
            return path
        record = {"sha256": want_sha, "stat": self._stamp(path)}
        if self.mode == "recorded" and self.records.get(rel) == record:
            self.trusted.append(rel)
            return path
        if sha256_file(path) != want_sha:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (file modified); rebuild or re-pull")
        self.hashed.append(rel)
        self.records[rel] = record
        self._changed = True
        return path

    def record_written(self, entries: list[FileEntry | EngineEntry]) -> None:
        """Record files this process just wrote with the hashes it computed (build, pull, refit): no re-hash."""
        for entry in entries:
            rel, _, sha = _entry_fields(entry)
            self.records[rel] = {"sha256": sha, "stat": self._stamp(self.artifact_dir / rel)}
        self._changed = True
        self.save()

    def save(self) -> None:
        """Write the records if they changed (best effort: a read-only cache only costs the next run a hash)."""
        if not self._changed:
            return
        with contextlib.suppress(OSError):
            write_text_atomic(self.path, json.dumps(self.records, sort_keys=True))
        self._changed = False


def _as_manifest(manifest: Manifest | dict[str, Any]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else validate_manifest(manifest)


# Legacy helpers for modules not converted to the typed API yet: a manifest (typed or dict) in, JSON dicts out.
# New code calls the ``Manifest`` methods, which return the typed entries.


def common_file_entries(manifest: Manifest | dict[str, Any]) -> list[dict[str, Any]]:
    """``Manifest.common_file_entries`` as JSON dicts."""
    return [e.to_json() for e in _as_manifest(manifest).common_file_entries()]


def engine_entries(manifest: Manifest | dict[str, Any]) -> list[dict[str, Any]]:
    """``Manifest.engine_entries`` as JSON dicts."""
    return [e.to_json() for e in _as_manifest(manifest).engine_entries()]


def all_file_entries(manifest: Manifest | dict[str, Any]) -> list[dict[str, Any]]:
    """``Manifest.all_file_entries`` as JSON dicts."""
    return [e.to_json() for e in _as_manifest(manifest).all_file_entries()]
