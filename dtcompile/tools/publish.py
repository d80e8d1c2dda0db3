"""Publish an artifact as per-arch archives, and pull one arch of it back, verified and safely extracted.

Input of ``publish_artifact``: an artifact folder (``dtc build`` output). Output: a published version::

    <URL>/<name>/index.json                   published versions, newest last (rewritten after each publish)
    <URL>/<name>/<key>/manifest.json          the artifact's manifest, byte for byte
    <URL>/<name>/<key>/common.tar             pipeline/ and onnx/: what every machine needs (the onnxruntime model)
    <URL>/<name>/<key>/<backend>-<arch>.tar   the engines of one TensorRT flavour and arch (tensorrt-rtx-sm_89.tar)
    <URL>/<name>/<key>/version.json           when and what was published (feeds index.json; not trusted)
    <URL>/<name>/<key>/SHA256SUMS             sha256 of manifest.json and of every archive (``sha256sum -c`` format);
                                              written last, so its presence marks a complete version

Input of ``pull_artifact``: a version URL (``<URL>/<name>/<key>``) or a name URL (``<URL>/<name>``, newest version
that has the requested arch). Output: an artifact folder with the common files and the engines of one arch, which
``dtc run`` takes like a built one. Its manifest lists only the pulled engines; ``Manifest.pulled`` records the
source, the archives and every engine that was published.

Versions are keyed by the artifact key and never overwritten. Archives are deterministic (sorted members, mtime 0,
uid/gid 0, mode 0644, no compression), so packing the same files twice gives the same bytes. A pull checks every
sha256 (SHA256SUMS for manifest and archives before anything is parsed or unpacked; the manifest's per-file sha256
for every extracted file), extracts member by member (regular files only; no absolute paths, ``..``, links or
devices; only the files the manifest lists) into a temp folder next to ``--out``, and renames it into place at the
end: any failure leaves ``--out`` as it was.

Plain paths and ``file://`` URLs use the local filesystem; any other ``scheme://`` goes through fsspec (s3://, gs://,
hf://, memory://), imported on first use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from dtcompile.core.digests import sha256_file
from dtcompile.core.errors import ArtifactError, DtcError, MissingDependencyError, UnsupportedError, VerificationError
from dtcompile.core.files import (
    as_written_to,
    check_replaceable,
    collect_stale,
    fault_point,
    make_temp_dir,
    public_message,
    replace_dir,
)
from dtcompile.core.targets import TRT_ARCHS, TRT_EXTRAS, arch_order, gpu_arch, installed_trt_major, is_arch
from dtcompile.manifest import (
    MANIFEST,
    Manifest,
    Verifier,
    read_manifest,
    verify_file,
    write_manifest,
)

log = logging.getLogger("dtcompile.publish")

COMMON = "common.tar"
SUMS = "SHA256SUMS"
VERSION = "version.json"
INDEX = "index.json"
INDEX_SCHEMA = 1
BACKEND_FILTERS = ("all", *TRT_ARCHS)
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------------------------
# Archives


@dataclass(frozen=True)
class Archive:
    """One archive of a published version: its file name, the engines it serves and the manifest entries in it."""

    file: str
    backend: str
    arch: str
    entries: tuple[dict[str, Any], ...]

    @property
    def trt_version(self) -> str | None:
        """TensorRT version the archive's engines were built with (None for the common archive)."""
        versions = {str(e["trt_version"]) for e in self.entries if e.get("trt_version")}
        return versions.pop() if len(versions) == 1 else None


def _check_relpath(rel: Any, where: str) -> str:
    """``rel`` if it is a plain relative POSIX path inside the artifact, else ArtifactError."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where}: file path {rel!r} is not a non-empty string")
    bad = (
        rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
        or rel == MANIFEST
    )
    if bad:
        raise ArtifactError(f"{where}: file path {rel!r} is not a plain relative path inside the artifact")
    return rel


def plan_archives(manifest: Manifest) -> list[Archive]:
    """The archives a manifest's files go into: ``common.tar`` first, then one per (backend, arch), sorted.

    ``Manifest.common_file_entries`` (pipeline, ONNX graphs and external data, weight maps, LoRA base weights) and
    arch-independent engines (onnxruntime, arch "any") go into the common archive; every other engine into
    ``<backend>-<arch>.tar``.
    """
    common: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def add(bucket: dict[str, dict[str, Any]], entry: dict[str, Any]) -> None:
        rel = _check_relpath(entry.get("file"), "manifest")
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise ArtifactError(f"manifest: entry for {rel!r} lacks its sha256 or size")
        other = bucket.get(rel)
        if other is not None and (other["sha256"], other["size"]) != (entry["sha256"], entry["size"]):
            raise ArtifactError(f"manifest: {rel!r} is listed twice with different sha256; rebuild the artifact")
        bucket[rel] = entry

    for file in manifest.common_file_entries():
        add(common, file.to_json())
    for engine in (e.to_json() for e in manifest.engine_entries()):
        if engine.get("arch") == "any":
            add(common, engine)
            continue
        backend, arch = engine.get("backend"), engine.get("arch")
        for what, value in (("backend", backend), ("arch", arch)):
            if not isinstance(value, str) or not _COMPONENT.match(value):
                raise ArtifactError(f"manifest: engine {engine.get('file')!r} has an invalid {what} {value!r}")
        assert isinstance(backend, str) and isinstance(arch, str)  # checked above
        add(groups.setdefault((backend, arch), {}), engine)
    archives = [Archive(COMMON, "any", "any", tuple(common[k] for k in sorted(common)))]
    for (backend, arch), files in sorted(groups.items(), key=lambda kv: (kv[0][0], arch_order(kv[0][1]))):
        clash = sorted(set(files) & set(common))
        if clash:
            raise ArtifactError(f"manifest: {clash[0]!r} is both a common file and a {backend} {arch} engine")
        archives.append(Archive(f"{backend}-{arch}.tar", backend, arch, tuple(files[k] for k in sorted(files))))
    return archives


def pack_tar(root: Path, entries: tuple[dict[str, Any], ...] | list[dict[str, Any]], out: Path) -> None:
    """Write the files of ``entries`` (paths relative to ``root``) into an uncompressed, deterministic tar.

    Members are sorted and carry mtime 0, uid/gid 0, no owner names and mode 0644, so equal files give equal bytes.
    """
    with open(out, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(entries, key=lambda e: e["file"]):
            path = Path(root) / entry["file"]
            info = tarfile.TarInfo(entry["file"])
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tf.addfile(info, f)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"an unsupported member type ({member.type!r})"


def _check_member(member: tarfile.TarInfo, label: str, root: Path, data_filter: Any, seen: set[str]) -> None:
    """ArtifactError unless ``member`` is a regular file or plain folder at a plain relative path inside ``root``,
    not met before (``seen``, updated)."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArtifactError(f"{label}: member {name!r} has an absolute path; refusing to extract")
    if "\\" in name or "\0" in name or any(p in ("..",) for p in name.split("/")):
        raise ArtifactError(f"{label}: member {name!r} escapes the artifact folder; refusing to extract")
    if not (member.isdir() or member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        raise ArtifactError(f"{label}: member {name!r} is {_member_kind(member)}; refusing to extract")
    if any(p in ("", ".") for p in name.rstrip("/").split("/")):
        raise ArtifactError(f"{label}: member {name!r} is not a plain relative path; refusing to extract")
    if name in seen:
        raise ArtifactError(f"{label}: member {name!r} appears twice; refusing to extract")
    seen.add(name)
    if data_filter is not None:
        try:
            data_filter(member, str(root))
        except tarfile.FilterError as exc:
            raise ArtifactError(f"{label}: member {name!r} rejected ({exc}); refusing to extract") from None


def _extract_listed_file(
    tf: tarfile.TarFile, member: tarfile.TarInfo, entry: dict[str, Any] | None, root: Path, label: str
) -> None:
    """Extract one regular member that ``entry`` lists, checking its size and sha256 against the entry."""
    name = member.name
    if entry is None:
        raise ArtifactError(f"{label}: member {name!r} is not listed in the manifest; refusing to extract")
    if member.size != entry["size"]:
        raise VerificationError(
            f"{label}: member {name!r} is {member.size} bytes but the manifest says {entry['size']}"
        )
    target = root / name
    _mkdir_inside(root, target.parent, label)
    src = tf.extractfile(member)
    if src is None:  # pragma: no cover - regular members always have a file object
        raise ArtifactError(f"{label}: member {name!r} has no data")
    digest = _copy_new_file(src, target)
    if digest != entry["sha256"]:
        raise VerificationError(
            f"{label}: {name!r} does not match its sha256 in the manifest (corrupt or tampered archive)"
        )


def safe_extract(tar_path: Path, dest: Path, entries: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
    """Extract exactly the files ``entries`` list from ``tar_path`` into ``dest``, checking each one.

    Member by member: only regular files (and plain folders); no absolute paths, ``..``, links, devices or FIFOs;
    no duplicates; no member the entries do not list; each file's size and sha256 must match its entry, and every
    listed file must be present. Raises ArtifactError (unsafe or unexpected archive) or VerificationError (content).
    """
    label = Path(tar_path).name
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    expected = {e["file"]: e for e in entries}
    folders = {"/".join(f.split("/")[:i]) for f in expected for i in range(1, f.count("/") + 1)}
    seen: set[str] = set()
    data_filter = getattr(tarfile, "data_filter", None)
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for member in tf:
                name = member.name
                _check_member(member, label, root, data_filter, seen)
                if not member.isdir():
                    _extract_listed_file(tf, member, expected.get(name), root, label)
                elif name in folders:
                    _mkdir_inside(root, root / name, label)
                else:
                    raise ArtifactError(
                        f"{label}: folder member {name!r} holds no file the manifest lists; refusing to extract"
                    )
    except tarfile.TarError as exc:
        raise ArtifactError(f"{label}: not a valid uncompressed tar archive ({exc})") from None
    except OSError as exc:
        raise ArtifactError(f"{label}: cannot extract ({exc.strerror or exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 1} more file(s)" if len(missing) > 1 else ""
        raise ArtifactError(f"{label}: archive lacks {missing[0]!r}{more} listed in the manifest")


def _mkdir_inside(root: Path, path: Path, label: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ArtifactError(f"{label}: {path} resolves outside the artifact folder; refusing to extract")


def _copy_new_file(src: Any, target: Path) -> str:
    """Copy ``src`` into a file that must not exist yet (no following links); return its sha256."""
    h = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(_CHUNK):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def format_sums(sums: dict[str, str]) -> str:
    """``sha256sum``-style lines (``<hex>  <file>``), sorted by file."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def parse_sums(text: str, where: str) -> dict[str, str]:
    """File -> sha256 from a SHA256SUMS text; ArtifactError on any malformed line or duplicate."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *]([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if not m:
            raise ArtifactError(f"{where}:{i}: not a '<sha256>  <file>' line: {line[:80]!r}")
        if m.group(2) in out:
            raise ArtifactError(f"{where}:{i}: {m.group(2)} is listed twice")
        out[m.group(2)] = m.group(1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stores: the local filesystem, or fsspec for everything else


class _Store:
    """Where published versions live; paths are relative to the URL and use '/'."""

    url: str

    def url_of(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def get_file(self, rel: str, dest: Path) -> None:
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def list_dirs(self, rel: str) -> list[str]:
        raise NotImplementedError

    def collect(self, rel: str) -> None:
        """Remove what killed publishes of version ``rel`` left (partial archives, temp index files)."""

    @contextmanager
    def stage(self, rel: str) -> Iterator[Path]:
        """A local folder to fill; on success its files become ``rel`` (``SHA256SUMS`` last)."""
        raise NotImplementedError
        yield  # pragma: no cover


class LocalStore(_Store):
    """A folder on this machine (plain path or file:// URL); writes are temp file + rename."""

    def __init__(self, root: Path, url: str | None = None) -> None:
        self.root = Path(root)
        self.url = url or str(root)

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def get_file(self, rel: str, dest: Path) -> None:
        shutil.copyfile(self._path(rel), dest)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)  # collect_stale
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list_dirs(self, rel: str) -> list[str]:
        path = self._path(rel)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))

    def collect(self, rel: str) -> None:
        final = self._path(rel)
        for path in (final, final.parent / INDEX):
            for line in collect_stale(path):
                log.warning("publish: %s", line)

    @contextmanager
    def stage(self, rel: str) -> Iterator[Path]:
        final = self._path(rel)
        created = _missing_parents(final)  # removed again (when still empty) if the publish fails
        final.parent.mkdir(parents=True, exist_ok=True)
        for line in collect_stale(final):  # partial archives a killed publish left (its pid no longer runs)
            log.warning("publish: %s", line)
        try:
            tmp = make_temp_dir(final, "tmp")  # `.<key>.tmp-<pid>-XXXX`: collect_stale can tell a dead writer's
        except BaseException:
            _cleanup(None, created)
            raise
        try:
            yield tmp
            if (final / SUMS).exists():
                raise ArtifactError(f"{self.url_of(rel)}: published by someone else meanwhile; not overwritten")
            if final.exists():  # an interrupted earlier publish (no SHA256SUMS): not a published version
                shutil.rmtree(final)
            for p in [tmp, *tmp.iterdir()]:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
            fault_point("publish:staged")
            os.replace(tmp, final)
            fault_point("publish:renamed")
        except OSError as exc:  # a full disk: name the version folder written to, not the temp folder
            _cleanup(tmp, created)
            raise as_written_to(exc, tmp, final) from None
        except BaseException:
            _cleanup(tmp, created)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class FsspecStore(_Store):
    """Any fsspec URL (s3://, gs://, hf://, memory://, ...); SHA256SUMS is uploaded last."""

    def __init__(self, url: str) -> None:
        scheme = urllib.parse.urlsplit(url).scheme
        try:
            import fsspec
        except ImportError:
            raise MissingDependencyError("fsspec", "publish", f"needed for {scheme}:// URLs") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise UnsupportedError(
                f"{url}: the fsspec backend for {scheme}:// is not installed ({exc}); install it (s3fs, gcsfs, "
                "huggingface_hub, ...) or publish to a folder"
            ) from None
        except ValueError as exc:
            raise UnsupportedError(f"{url}: fsspec cannot open it ({exc}); check the URL") from None
        self.url = url
        self.root = str(self.root).rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(rel)))

    def get_file(self, rel: str, dest: Path) -> None:
        self.fs.get_file(self._path(rel), str(dest))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)

    def list_dirs(self, rel: str) -> list[str]:
        try:
            items = self.fs.ls(self._path(rel), detail=True)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(str(i["name"]).rstrip("/")).name for i in items if i.get("type") == "directory")

    @contextmanager
    def stage(self, rel: str) -> Iterator[Path]:
        tmp = Path(tempfile.mkdtemp(prefix="dtc-publish-"))
        try:
            yield tmp
            if self.exists(f"{rel}/{SUMS}"):
                raise ArtifactError(f"{self.url_of(rel)}: published by someone else meanwhile; not overwritten")
            self.fs.makedirs(self._path(rel), exist_ok=True)
            files = sorted(p.name for p in tmp.iterdir() if p.name != SUMS) + [SUMS]
            for name in files:
                self.fs.put_file(str(tmp / name), self._path(f"{rel}/{name}"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def open_store(url: str) -> _Store:
    """The store for ``url``: a plain path or file:// (local filesystem), else fsspec."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedError(f"{url}: file:// URLs must name a local path (file:///srv/engines)")
        return LocalStore(Path(urllib.parse.unquote(parts.path)), url)
    if "://" in url:
        return FsspecStore(url)
    return LocalStore(Path(url), url)


def _read(store: _Store, rel: str, what: str) -> bytes:
    try:
        return store.read_bytes(rel)
    except FileNotFoundError:
        raise ArtifactError(f"{store.url_of(rel)}: {what} not found") from None
    except OSError as exc:
        raise ArtifactError(f"{store.url_of(rel)}: cannot read {what} ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# Publish


@dataclass
class PublishReport:
    """A published (or already published) version: where, which key, which archives."""

    url: str
    name: str
    key: str
    archives: list[dict[str, Any]] = field(default_factory=list)
    already: bool = False
    identical: bool = True


def _name_and_key(manifest: Manifest, where: str) -> tuple[str, str]:
    name, key = manifest.name, manifest.key
    if not isinstance(name, str) or not _COMPONENT.match(name):
        raise ArtifactError(f"{where}: manifest name {name!r} cannot be a folder name; rebuild the artifact")
    if not isinstance(key, str) or not _KEY.match(key):
        raise ArtifactError(f"{where}: manifest key {key!r} is not a sha256 hex digest; rebuild the artifact")
    return name, key


def publish_artifact(artifact_dir: Path, url: str) -> PublishReport:
    """Publish ``artifact_dir`` to ``<url>/<name>/<key>/``; a key already published there is left as it is.

    Every file is checked against the manifest (sha256) before packing. The version folder appears complete or not
    at all on a local filesystem (rename); elsewhere SHA256SUMS is uploaded last and marks it complete. The name's
    index.json is rewritten from the complete version folders afterwards.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if manifest.stopped_after:
        raise ArtifactError(
            f"{artifact_dir}: stopped after stage '{manifest.stopped_after}'; only a complete build can be published"
        )
    name, key = _name_and_key(manifest, str(artifact_dir / MANIFEST))
    archives = plan_archives(manifest)
    if len(archives) == 1 and not archives[0].entries:
        raise ArtifactError(f"{artifact_dir}: the manifest lists no files to publish")
    for archive in archives:
        for entry in archive.entries:
            verify_file(artifact_dir, entry)
    manifest_sha = sha256_file(artifact_dir / MANIFEST)
    store = open_store(url)
    vrel = f"{name}/{key}"
    store.collect(vrel)
    if store.exists(f"{vrel}/{SUMS}"):
        published = parse_sums(_read(store, f"{vrel}/{SUMS}", SUMS).decode("utf-8", "replace"), store.url_of(vrel))
        _write_index(store, name)
        return PublishReport(
            store.url_of(vrel), name, key, already=True, identical=published.get(MANIFEST) == manifest_sha
        )

    report = PublishReport(store.url_of(vrel), name, key)
    with store.stage(vrel) as stage:
        sums = {MANIFEST: manifest_sha}
        shutil.copyfile(artifact_dir / MANIFEST, stage / MANIFEST)
        for archive in archives:
            out = stage / archive.file
            pack_tar(artifact_dir, archive.entries, out)
            fault_point(f"publish:archive:{archive.file}")
            sums[archive.file] = sha256_file(out)
            report.archives.append(
                {
                    "file": archive.file,
                    "backend": archive.backend,
                    "arch": archive.arch,
                    "trt_version": archive.trt_version,
                    "sha256": sums[archive.file],
                    "size": out.stat().st_size,
                }
            )
            log.info("packed %s (%.1f MB)", archive.file, out.stat().st_size / 2**20)
        from dtcompile.core.versions import DTC_VERSION as __version__

        version = {
            "name": name,
            "key": key,
            "published_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "dtc_version": __version__,
            "manifest_sha256": manifest_sha,
            "archives": report.archives,
        }
        (stage / VERSION).write_text(json.dumps(version, indent=2, sort_keys=True) + "\n")
        (stage / SUMS).write_text(format_sums(sums))
    _write_index(store, name)
    log.debug("published %s %s to %s", name, key[:12], report.url)
    return report


def _write_index(store: _Store, name: str) -> None:
    """Rewrite ``<name>/index.json`` from the complete version folders (oldest first, ``latest`` the newest)."""
    versions = []
    for key in store.list_dirs(name):
        if not _KEY.match(key) or not store.exists(f"{name}/{key}/{SUMS}"):
            continue
        try:
            info = json.loads(store.read_bytes(f"{name}/{key}/{VERSION}"))
        except (OSError, ValueError):
            info = {"key": key, "archives": []}
        if isinstance(info, dict) and info.get("key") == key:
            versions.append(info)
    if not versions:
        return
    versions.sort(key=lambda v: (str(v.get("published_at", "")), v["key"]))
    index = {"schema_version": INDEX_SCHEMA, "name": name, "latest": versions[-1]["key"], "versions": versions}
    store.write_bytes(f"{name}/{INDEX}", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# Pull


@dataclass
class PullReport:
    """A pulled artifact: where it went, from which version, which archives and engines."""

    artifact_dir: Path
    url: str
    name: str
    key: str
    arch: str
    archives: list[str] = field(default_factory=list)
    engines: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _detect_gpu_arch() -> str | None:
    """This machine's CUDA arch (sm_89) or None; a seam for tests."""
    return gpu_arch()


def _archs_text(pairs: list[tuple[str, str]]) -> str:
    by_backend: dict[str, list[str]] = {}
    for backend, arch in pairs:
        by_backend.setdefault(backend, []).append(arch)
    parts = [f"{b} {', '.join(sorted(set(a), key=arch_order))}" for b, a in sorted(by_backend.items())]
    return "; ".join(parts) or "no engines"


def _archive_pairs(files: Any) -> list[tuple[str, str]]:
    """(backend, arch) of every engine archive name in ``files``."""
    out = []
    for f in files:
        if f.endswith(".tar") and f != COMMON and "-" in f:
            backend, arch = f[: -len(".tar")].rsplit("-", 1)
            out.append((backend, arch))
    return sorted(out)


def _wants(pair: tuple[str, str], arch: str, backend: str) -> bool:
    return pair[1] == arch and backend in ("all", pair[0])


def _resolve_version(store: _Store, key: str | None, arch: str, backend: str) -> tuple[str, str]:
    """(relative version folder, how it was chosen) for a version URL or a name URL holding index.json."""
    if store.exists(SUMS):
        if key and not PurePosixPath(urllib.parse.urlsplit(store.url).path.rstrip("/")).name.startswith(key):
            raise ArtifactError(f"{store.url}: is a single published version; --key {key} does not match it")
        return "", "version URL"
    if not store.exists(INDEX):
        names = [n for n in store.list_dirs("") if store.exists(f"{n}/{INDEX}")]
        hint = f"; published here: {', '.join(names)} (pull {store.url_of(names[0])})" if names else ""
        raise ArtifactError(
            f"{store.url}: no published artifact here (no {SUMS} or {INDEX}); pass <URL>/<name> or "
            f"<URL>/<name>/<key> as written by dtc publish{hint}"
        )
    try:
        index = json.loads(_read(store, INDEX, INDEX))
        versions = [v for v in index["versions"] if isinstance(v, dict) and _KEY.match(str(v.get("key")))]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{store.url_of(INDEX)}: not a valid dtc index; re-run dtc publish to rewrite it") from None
    newest_first = list(reversed(versions))
    if not newest_first:
        raise ArtifactError(
            f"{store.url_of(INDEX)}: lists no usable version (none with a valid key); re-run dtc publish to rewrite "
            "it, or pull a version URL <URL>/<name>/<key>"
        )
    if key:
        newest_first = [v for v in newest_first if v["key"].startswith(key)]
        if not newest_first:
            keys = ", ".join(v["key"][:12] for v in versions[-5:]) or "none"
            raise ArtifactError(
                f"--key {key}: no published version of {index.get('name')} starts with it (newest: {keys})"
            )
    if arch in ("any", "auto"):
        return newest_first[0]["key"], "newest version"
    for v in newest_first:
        listed = v.get("archives")
        archives = listed if isinstance(listed, list) else []
        pairs = _archive_pairs(str(a.get("file", "")) for a in archives if isinstance(a, dict))
        if any(_wants(p, arch, backend) for p in pairs):
            return v["key"], f"newest version with {arch}"
    # None has it: the chosen version's manifest produces the precise error (what was built instead).
    return newest_first[0]["key"], "newest version"


def _no_gpu_error(published: list[tuple[str, str]]) -> ArtifactError:
    archs = sorted({a for _, a in published}, key=arch_order)
    example = archs[0] if archs else "sm_89"
    return ArtifactError(
        f"--arch auto: no CUDA GPU found; pass --arch {example} (published: {', '.join(archs) or 'none'}), "
        "or --arch any for the onnxruntime model only"
    )


def pull_artifact(
    url: str,
    out_dir: Path,
    *,
    arch: str = "auto",
    backend: str = "all",
    key: str | None = None,
    force: bool = False,
) -> PullReport:
    """Fetch one arch of a published artifact into ``out_dir``, verified, or raise and leave ``out_dir`` as it was.

    ``arch``: "auto" (this machine's GPU), "any" (common files only: the onnxruntime model) or an arch such as
    "sm_89". ``backend``: "all" TensorRT flavours published for that arch, or just "tensorrt-rtx" / "tensorrt".
    ``key``: a key prefix, to pick a version from a name URL (default: the newest one that has the arch).
    ``force``: replace an existing ``out_dir``.
    """
    if backend not in BACKEND_FILTERS:
        raise UnsupportedError(f"--backend {backend!r}: choose one of: {', '.join(BACKEND_FILTERS)}")
    if arch not in ("auto", "any") and not is_arch(arch):
        raise UnsupportedError(f"--arch {arch!r}: pass auto, any or a CUDA arch such as sm_89")
    out_dir = Path(out_dir)
    exists = out_dir.exists() or out_dir.is_symlink()
    if exists and not force and (out_dir.is_symlink() or not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArtifactError(f"--out {out_dir}: already exists; choose a new folder or pass --force to replace it")
    check_replaceable(out_dir, "--out")  # --force replaces an artifact folder, never a user's other files
    store = open_store(url)
    if arch == "auto":
        arch = _detect_gpu_arch() or "auto"  # still "auto" without a GPU: the error lists what was published
    vrel, how = _resolve_version(store, key, arch, backend)
    vurl = store.url_of(vrel)

    created = _missing_parents(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for line in collect_stale(out_dir):
        log.warning("pull: %s", line)
    tmp = make_temp_dir(out_dir, "pull")
    try:
        report = _pull_into(store, vrel, vurl, tmp, arch, backend, how)
        report.artifact_dir = out_dir
        replace_dir(tmp / "artifact", out_dir)
        Verifier(out_dir).record_written(read_manifest(out_dir).all_file_entries())  # each member was hashed
    except DtcError as exc:
        _cleanup(tmp, created)
        # a message names the published file or --out, never the temp folder (gone by the time it prints)
        public_message(exc, {tmp / "download": vurl, tmp / "artifact": out_dir, tmp: out_dir})
        if type(exc) in (ArtifactError, VerificationError):
            raise type(exc)(f"{exc}; nothing was extracted to {out_dir}") from None
        raise
    except OSError as exc:
        _cleanup(tmp, created)
        if exc.errno in LOCAL_WRITE_ERRORS:  # name --out, not the temp folder that is gone now
            raise OSError(exc.errno, f"{exc.strerror}; nothing was extracted", str(out_dir)) from None
        raise
    except BaseException:
        _cleanup(tmp, created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    for w in report.warnings:
        log.warning("%s", w)
    return report


def _fetch_manifest(store: _Store, join: Any, vurl: str, download: Path) -> tuple[dict[str, str], Manifest]:
    """SHA256SUMS and the manifest it vouches for (fetched into ``download``, checked before it is parsed)."""
    sums = parse_sums(_read(store, join(SUMS), SUMS).decode("utf-8", "replace"), f"{vurl}/{SUMS}")
    if MANIFEST not in sums:
        raise VerificationError(f"{vurl}/{SUMS}: does not list {MANIFEST}; the version is incomplete or tampered")
    _fetch(store, join(MANIFEST), download / MANIFEST)
    if sha256_file(download / MANIFEST) != sums[MANIFEST]:
        raise VerificationError(f"{vurl}/{MANIFEST}: sha256 does not match {SUMS} (corrupt or tampered manifest)")
    return sums, read_manifest(download)


def _wanted_archives(archives: list[Archive], arch: str, backend: str, name: str, key: str) -> list[Archive]:
    """The common archive and those of ``arch`` (filtered by ``backend``); ArtifactError when there are none."""
    published = [(a.backend, a.arch) for a in archives[1:]]
    if arch == "auto":
        raise _no_gpu_error(published)
    wanted = [archives[0]] + [a for a in archives[1:] if arch != "any" and _wants((a.backend, a.arch), arch, backend)]
    if arch != "any" and len(wanted) == 1:
        flavour = "" if backend == "all" else f"{backend} "
        raise ArtifactError(
            f"--arch {arch}: no {flavour}engine was built for it in {name} {key[:12]} (published: "
            f"{_archs_text(published)}); add {arch} to engine.targets and rebuild, or pass --arch any for the "
            "onnxruntime model only"
        )
    return wanted


def _fetch_and_extract(
    store: _Store, join: Any, vurl: str, sums: dict[str, str], wanted: list[Archive], download: Path, stage: Path
) -> None:
    """Fetch every wanted archive and check it against SHA256SUMS before any is opened, then extract them."""
    for archive in wanted:
        if archive.file not in sums:
            raise VerificationError(
                f"{vurl}/{SUMS}: does not list {archive.file}; the version is incomplete or tampered"
            )
    for archive in wanted:
        _fetch(store, join(archive.file), download / archive.file)
    for archive in wanted:
        if sha256_file(download / archive.file) != sums[archive.file]:
            raise VerificationError(f"{archive.file}: sha256 does not match {SUMS} (corrupt or tampered download)")
    for archive in wanted:
        safe_extract(download / archive.file, stage, archive.entries)
        (download / archive.file).unlink()


def _pulled_manifest(
    manifest: Manifest, wanted: list[Archive], published: list[tuple[str, str]], sums: dict[str, str], vurl: str,
    how: str,
) -> Manifest:  # fmt: skip
    """The manifest of the pulled copy: only the pulled engines, and a ``pulled`` record of where it came from."""
    pairs = {(a.backend, a.arch) for a in wanted[1:]}
    pulled = manifest.model_copy(deep=True)
    for comp in pulled.components.values():
        comp.engines = [e for e in comp.engines if e.arch == "any" or (e.backend, e.arch) in pairs]
    pulled.pulled = {
        "from": vurl,
        "key": manifest.key,
        "chosen": how,
        "manifest_sha256": sums[MANIFEST],
        "archives": [{"file": a.file, "sha256": sums[a.file]} for a in wanted],
        "published": [{"backend": b, "arch": a} for b, a in published],
    }
    return pulled


def _runtime_warnings(wanted: list[Archive]) -> list[str]:
    """What `dtc run` will refuse here: a TensorRT flavour not installed, or another major version."""
    warnings = []
    for a in wanted[1:]:
        installed = installed_trt_major(a.backend)
        built = a.trt_version
        if installed is None:
            warnings.append(
                f"{a.backend} is not installed here; dtc run needs it for {a.file} "
                f"(pip install 'dtcompile[{TRT_EXTRAS[a.backend]}]')"
            )
        elif built and str(installed) != built.split(".")[0]:
            warnings.append(
                f"{a.file} was built with {a.backend} {built}; this machine has major version {installed}, "
                "so dtc run will refuse it here"
            )
    return warnings


def _pull_into(store: _Store, vrel: str, vurl: str, tmp: Path, arch: str, backend: str, how: str) -> PullReport:
    """Download, verify and extract into ``tmp/artifact``; ``tmp/download`` holds the fetched files."""
    join = (lambda f: f"{vrel}/{f}") if vrel else (lambda f: f)
    download, stage = tmp / "download", tmp / "artifact"
    download.mkdir()
    stage.mkdir()
    sums, manifest = _fetch_manifest(store, join, vurl, download)
    name, key = _name_and_key(manifest, f"{vurl}/{MANIFEST}")
    folder_key = PurePosixPath(urllib.parse.urlsplit(vurl).path.rstrip("/")).name
    if _KEY.match(folder_key) and folder_key != key:
        raise VerificationError(f"{vurl}/{MANIFEST}: key {key[:12]} does not match its folder {folder_key[:12]}")
    archives = plan_archives(manifest)
    published = [(a.backend, a.arch) for a in archives[1:]]
    wanted = _wanted_archives(archives, arch, backend, name, key)
    _fetch_and_extract(store, join, vurl, sums, wanted, download, stage)
    write_manifest(stage, _pulled_manifest(manifest, wanted, published, sums, vurl, how))
    report = PullReport(stage, vurl, name, key, arch, [a.file for a in wanted])
    report.engines = [{"backend": "onnxruntime", "arch": "any"}] + [
        {"backend": a.backend, "arch": a.arch} for a in wanted[1:]
    ]
    report.warnings = _runtime_warnings(wanted)
    return report


LOCAL_WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _fetch(store: _Store, rel: str, dest: Path) -> None:
    try:
        store.get_file(rel, dest)
    except FileNotFoundError:
        raise ArtifactError(f"{store.url_of(rel)}: not found; the version is incomplete") from None
    except OSError as exc:
        if exc.errno in LOCAL_WRITE_ERRORS:  # this machine's disk, not the store: pull_artifact names --out
            raise
        raise ArtifactError(f"{store.url_of(rel)}: download failed ({exc})") from None


def _missing_parents(path: Path) -> list[Path]:
    """Ancestors of ``path`` that do not exist yet (deepest first), to remove again after a failure."""
    out = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        out.append(parent)
    return out


def _cleanup(tmp: Path | None, created: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for parent in created:
        try:
            parent.rmdir()
        except OSError:
            break
