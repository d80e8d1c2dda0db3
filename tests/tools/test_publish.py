"""Publish and pull: deterministic per-arch archives, versions never overwritten, every sha256 checked, safe
extraction, and tampering (flipped byte, wrong manifest, ``../`` and link members, unbuilt arch) refused with one
line while leaving nothing extracted. Synthetic artifacts (fake engine bytes, real manifest helpers) keep these
fast; one end-to-end test builds, publishes, pulls and runs the real tiny-flux recipe."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.digests import sha256_file
from dtcompile.core.errors import ArtifactError, DtcError, MissingDependencyError, UnsupportedError, VerificationError
from dtcompile.manifest import (
    SCHEMA_VERSION,
    Manifest,
    file_entry,
    read_manifest,
    verify_file,
    write_manifest,
)
from dtcompile.runtime.engines import select_engine
from dtcompile.tools import publish as pub
from dtcompile.tools.publish import (
    COMMON,
    INDEX,
    SUMS,
    format_sums,
    pack_tar,
    parse_sums,
    plan_archives,
    publish_artifact,
    pull_artifact,
    safe_extract,
)

REPO = Path(__file__).resolve().parents[2]
KEY = "ab" * 32
ENGINES = (("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120"))


def make_artifact(
    root: Path,
    *,
    name: str = "tiny",
    key: str = KEY,
    engines: tuple[tuple[str, str], ...] = ENGINES,
    seed: int = 0,
) -> Path:
    """An artifact folder as `dtc build` writes it, with deterministic fake bytes instead of real models."""
    art = root / name

    def write(rel: str, size: int) -> Path:
        path = art / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(f"{rel}:{seed}".encode()).digest() * (size // 32 + 1))
        return path

    pipeline = [
        write("pipeline/model_index.json", 64),
        write("pipeline/scheduler/scheduler_config.json", 40),
        write("pipeline/text_encoder/model.safetensors", 3000),
        write("pipeline/vae/diffusion_pytorch_model.safetensors", 5000),
    ]
    graph = write("onnx/transformer.onnx", 2000)
    data = write("onnx/transformer.onnx.data", 7000)
    onnx_entry = {**file_entry(art, graph), "external_data": [file_entry(art, data)]}
    engine_entries: list[dict[str, Any]] = [{"backend": "onnxruntime", "arch": "any", **file_entry(art, graph)}]
    for backend, arch in engines:
        path = write(f"{backend}/{arch}/transformer.engine", 4000)
        engine_entries.append(
            {"backend": backend, "arch": arch, "trt_version": "1.2.0", "refittable": False, **file_entry(art, path)}
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "key": key,
        "dtype": "float32",
        "source": {"model": "builtin:tiny", "pipeline_class": "FluxPipeline"},
        "pipeline": {"files": [file_entry(art, p) for p in pipeline]},
        "components": {"transformer": {"onnx": onnx_entry, "engines": engine_entries}},
        "skipped": [],
    }
    write_manifest(art, manifest)
    return art


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "build")


@pytest.fixture
def published(art: Path, tmp_path: Path) -> Path:
    """The published name folder (<URL>/tiny)."""
    publish_artifact(art, str(tmp_path / "pub"))
    return tmp_path / "pub" / "tiny"


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pub, "_detect_gpu_arch", lambda: None)


def nothing_left(out: Path) -> None:
    """--out was not created and no temp folder is left beside it."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.exists() else True


def rewrite_sums(vdir: Path, **files: bytes) -> None:
    """Replace archives in a published version and fix SHA256SUMS to match (an attacker who controls both)."""
    sums = parse_sums((vdir / SUMS).read_text(), "test")
    for name, data in files.items():
        name = name.replace("__", "-")
        (vdir / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    (vdir / SUMS).write_text(format_sums(sums))


def evil_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


# --------------------------------------------------------------------------------------------------------------
# Packing


def test_plan_archives_splits_common_and_per_arch(art: Path) -> None:
    archives = plan_archives(read_manifest(art))
    assert [a.file for a in archives] == [COMMON, "tensorrt-rtx-sm_89.tar", "tensorrt-rtx-sm_120.tar"]
    common = [e["file"] for e in archives[0].entries]
    assert "onnx/transformer.onnx" in common and "onnx/transformer.onnx.data" in common
    assert common.count("onnx/transformer.onnx") == 1  # the onnxruntime entry is the same file
    assert [e["file"] for e in archives[1].entries] == ["tensorrt-rtx/sm_89/transformer.engine"]
    assert archives[1].trt_version == "1.2.0"


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "manifest.json", "a//b", ""])
def test_plan_archives_rejects_unsafe_manifest_paths(art: Path, bad: str) -> None:
    manifest = read_manifest(art)
    manifest.pipeline.files[0].file = bad
    with pytest.raises(ArtifactError, match="not a plain relative path|not a non-empty string"):
        plan_archives(manifest)


def test_pack_tar_is_deterministic(art: Path, tmp_path: Path) -> None:
    entries = plan_archives(read_manifest(art))[0].entries
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    pack_tar(art, entries, a)
    os.utime(art / "pipeline/model_index.json", (1, 1))  # mtimes do not leak into the archive
    pack_tar(art, list(reversed(entries)), b)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(e["file"] for e in entries)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


# --------------------------------------------------------------------------------------------------------------
# Publish


def test_publish_layout(art: Path, tmp_path: Path) -> None:
    report = publish_artifact(art, str(tmp_path / "pub"))
    vdir = tmp_path / "pub" / "tiny" / KEY
    assert report.url == str(vdir) and not report.already
    assert sorted(p.name for p in vdir.iterdir()) == sorted(
        [COMMON, "tensorrt-rtx-sm_120.tar", "tensorrt-rtx-sm_89.tar", "manifest.json", SUMS, "version.json"]
    )
    assert (vdir / "manifest.json").read_bytes() == (art / "manifest.json").read_bytes()
    sums = parse_sums((vdir / SUMS).read_text(), "test")
    assert set(sums) == {COMMON, "tensorrt-rtx-sm_120.tar", "tensorrt-rtx-sm_89.tar", "manifest.json"}
    assert all(sha256_file(vdir / f) == h for f, h in sums.items())
    index = json.loads((vdir.parent / INDEX).read_text())
    assert index["latest"] == KEY and [v["key"] for v in index["versions"]] == [KEY]
    assert not [p for p in vdir.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_publish_is_reproducible(art: Path, tmp_path: Path) -> None:
    publish_artifact(art, str(tmp_path / "p1"))
    publish_artifact(art, str(tmp_path / "p2"))
    for name in (COMMON, "tensorrt-rtx-sm_89.tar", SUMS):
        assert (tmp_path / "p1/tiny" / KEY / name).read_bytes() == (tmp_path / "p2/tiny" / KEY / name).read_bytes()


def test_republish_same_key_is_a_noop(art: Path, tmp_path: Path) -> None:
    publish_artifact(art, str(tmp_path / "pub"))
    vdir = tmp_path / "pub" / "tiny" / KEY
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in vdir.iterdir()}
    again = publish_artifact(art, str(tmp_path / "pub"))
    assert again.already and again.identical and not again.archives
    # A rebuild with the same key but other engine bytes (TensorRT builds are not bit-reproducible): kept as is.
    rebuilt = make_artifact(tmp_path / "rebuild", seed=1)
    third = publish_artifact(rebuilt, str(tmp_path / "pub"))
    assert third.already and not third.identical
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in vdir.iterdir()} == before


def test_publish_says_so_on_the_cli(art: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtcompile.cli import main

    main(["publish", str(art), "--to", str(tmp_path / "pub")])
    out = capsys.readouterr().out
    assert "published tiny key abababababab" in out and "tensorrt-rtx-sm_89.tar" in out
    main(["publish", str(art), "--to", str(tmp_path / "pub")])
    assert "already published" in capsys.readouterr().out


def test_publish_refuses_a_modified_artifact(art: Path, tmp_path: Path) -> None:
    engine = art / "tensorrt-rtx/sm_89/transformer.engine"
    data = bytearray(engine.read_bytes())
    data[10] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match the manifest"):
        publish_artifact(art, str(tmp_path / "pub"))
    assert not (tmp_path / "pub").exists()


def test_publish_refuses_a_stopped_build(art: Path, tmp_path: Path) -> None:
    manifest = read_manifest(art)
    manifest.stopped_after = "export"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="stopped after stage 'export'"):
        publish_artifact(art, str(tmp_path / "pub"))


def test_index_lists_every_version_and_pull_picks_the_newest_with_the_arch(tmp_path: Path) -> None:
    old = make_artifact(tmp_path / "a", key="11" * 32, engines=(("tensorrt-rtx", "sm_89"), ("tensorrt", "sm_90")))
    new = make_artifact(tmp_path / "b", key="22" * 32, engines=(("tensorrt-rtx", "sm_89"),), seed=2)
    url = str(tmp_path / "pub")
    publish_artifact(old, url)
    publish_artifact(new, url)
    index = json.loads((tmp_path / "pub/tiny" / INDEX).read_text())
    assert [v["key"] for v in index["versions"]] == ["11" * 32, "22" * 32] and index["latest"] == "22" * 32
    assert pull_artifact(f"{url}/tiny", tmp_path / "o1", arch="sm_89").key == "22" * 32
    assert pull_artifact(f"{url}/tiny", tmp_path / "o2", arch="sm_90").key == "11" * 32
    assert pull_artifact(f"{url}/tiny", tmp_path / "o3", arch="sm_89", key="1111").key == "11" * 32
    with pytest.raises(ArtifactError, match="--key 33: no published version"):
        pull_artifact(f"{url}/tiny", tmp_path / "o4", arch="sm_89", key="33")


# --------------------------------------------------------------------------------------------------------------
# Pull


def test_pull_round_trip_is_byte_identical(art: Path, published: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh" / "tiny"
    report = pull_artifact(str(published), out, arch="sm_89")
    assert report.archives == [COMMON, "tensorrt-rtx-sm_89.tar"]
    assert report.artifact_dir == out and report.key == KEY
    pulled = read_manifest(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    listed = sorted({e.file for e in pulled.all_file_entries()})
    assert files == sorted([*listed, "manifest.json"])
    for rel in listed:
        assert (out / rel).read_bytes() == (art / rel).read_bytes()
        verify_file(out, next(e for e in pulled.all_file_entries() if e.file == rel))
    assert not (out / "tensorrt-rtx/sm_120").exists()
    engines = pulled.components["transformer"].engines
    assert [(e.backend, e.arch) for e in engines] == [("onnxruntime", "any"), ("tensorrt-rtx", "sm_89")]
    assert pulled.pulled["published"] == [
        {"backend": "tensorrt-rtx", "arch": "sm_89"},
        {"backend": "tensorrt-rtx", "arch": "sm_120"},
    ]
    built = read_manifest(art)
    assert {k: v for k, v in pulled.to_json().items() if k not in ("pulled", "components")} == {
        k: v for k, v in built.to_json().items() if k != "components"
    }
    # `dtc run` picks from the pulled manifest as from a built one.
    assert select_engine(pulled, "transformer", "onnxruntime", None).file == "onnx/transformer.onnx"
    with pytest.raises(ArtifactError, match=r"no tensorrt-rtx engine for this GPU \(sm_120\); the artifact has sm_89"):
        select_engine(pulled, "transformer", "tensorrt-rtx", "sm_120")


def test_pull_version_url_and_file_url(published: Path, tmp_path: Path) -> None:
    r1 = pull_artifact(str(published / KEY), tmp_path / "v", arch="sm_120")
    assert r1.archives == [COMMON, "tensorrt-rtx-sm_120.tar"]
    r2 = pull_artifact(published.as_uri(), tmp_path / "f", arch="sm_89")
    assert r2.key == KEY and (tmp_path / "f/tensorrt-rtx/sm_89/transformer.engine").is_file()


def test_pull_arch_any_takes_only_the_common_archive(published: Path, tmp_path: Path) -> None:
    report = pull_artifact(str(published), tmp_path / "o", arch="any")
    assert report.archives == [COMMON]
    m = read_manifest(tmp_path / "o")
    assert [e.backend for e in m.components["transformer"].engines] == ["onnxruntime"]


def test_pull_auto_uses_the_gpu_arch(published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pub, "_detect_gpu_arch", lambda: "sm_120")
    assert pull_artifact(str(published), tmp_path / "o").archives == [COMMON, "tensorrt-rtx-sm_120.tar"]


def test_pull_auto_without_gpu_says_what_to_pass(published: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(ArtifactError) as err:
        pull_artifact(str(published), out)
    assert "--arch auto: no CUDA GPU found; pass --arch sm_89 (published: sm_89, sm_120)" in str(err.value)
    nothing_left(out)


def test_pull_refuses_an_existing_out(published: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists; choose a new folder or pass --force"):
        pull_artifact(str(published), out, arch="sm_89")
    assert (out / "keep").read_text() == "mine"
    # issue 32: --force replaces only a folder that holds an artifact, never a user's files
    with pytest.raises(ArtifactError, match="folder holds files but no dtcompile artifact"):
        pull_artifact(str(published), out, arch="sm_89", force=True)
    assert (out / "keep").read_text() == "mine"
    art = tmp_path / "a"
    pull_artifact(str(published), art, arch="sm_89")
    (art / "keep").write_text("inside the artifact")
    pull_artifact(str(published), art, arch="sm_89", force=True)
    assert not (art / "keep").exists() and (art / "manifest.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pull_force_never_replaces_a_regular_file(published: Path, tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(ArtifactError, match="is a file or a link, not an artifact folder; --force will not replace it"):
        pull_artifact(str(published), out, arch="sm_89", force=True)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert out.read_text() == "mine" and not [n for n in left if n.startswith(".")]  # no temp folder


def test_pull_from_fsspec_url(art: Path, tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://dtc-test-{os.getpid()}"
    publish_artifact(art, url)
    assert publish_artifact(art, url).already
    report = pull_artifact(f"{url}/tiny", tmp_path / "o", arch="sm_89")
    assert (tmp_path / "o/tensorrt-rtx/sm_89/transformer.engine").read_bytes() == (
        art / "tensorrt-rtx/sm_89/transformer.engine"
    ).read_bytes()
    assert report.url == f"{url}/tiny/{KEY}"


def test_missing_fsspec_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'dtcompile\[publish\]'"):
        pub.open_store("s3://bucket/engines")


def test_bad_urls_and_options(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="must name a local path"):
        pub.open_store("file://otherhost/srv")
    with pytest.raises(ArtifactError, match="no published artifact here"):
        pull_artifact(str(tmp_path), tmp_path / "o", arch="sm_89")
    with pytest.raises(UnsupportedError, match="--arch 'ampere'"):
        pull_artifact(str(tmp_path), tmp_path / "o", arch="ampere")


def test_base_url_lists_published_names(published: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="published here: tiny"):
        pull_artifact(str(published.parent), tmp_path / "o", arch="sm_89")


# --------------------------------------------------------------------------------------------------------------
# Tampering: one line, nothing extracted


def test_flipped_byte_in_an_archive(published: Path, tmp_path: Path) -> None:
    tar = published / KEY / "tensorrt-rtx-sm_89.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0x01
    tar.write_bytes(bytes(data))
    out = tmp_path / "new" / "deep" / "o"
    with pytest.raises(VerificationError) as err:
        pull_artifact(str(published), out, arch="sm_89")
    assert str(err.value).startswith("tensorrt-rtx-sm_89.tar: sha256 does not match SHA256SUMS")
    assert not (tmp_path / "new").exists()  # nor the parent folders the pull made


def test_manifest_not_matching_sums(published: Path, tmp_path: Path) -> None:
    path = published / KEY / "manifest.json"
    path.write_text(path.read_text().replace('"float32"', '"float16"'))
    out = tmp_path / "o"
    with pytest.raises(VerificationError, match="manifest.json: sha256 does not match SHA256SUMS"):
        pull_artifact(str(published), out, arch="sm_89")
    nothing_left(out)


def test_file_inside_archive_not_matching_manifest(published: Path, art: Path, tmp_path: Path) -> None:
    """SHA256SUMS rewritten to match a forged archive: the manifest's per-file sha256 still catches it."""
    engine = bytearray((art / "tensorrt-rtx/sm_89/transformer.engine").read_bytes())
    engine[0] ^= 0xFF
    forged = evil_tar([member("tensorrt-rtx/sm_89/transformer.engine", bytes(engine))])
    rewrite_sums(published / KEY, **{"tensorrt__rtx__sm_89.tar": forged})
    out = tmp_path / "o"
    with pytest.raises(VerificationError, match="does not match its sha256 in the manifest"):
        pull_artifact(str(published), out, arch="sm_89")
    nothing_left(out)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        pytest.param([member("../evil", b"x")], "escapes the artifact folder", id="dotdot"),
        pytest.param([member("tensorrt-rtx/../../evil", b"x")], "escapes the artifact folder", id="nested-dotdot"),
        pytest.param([member("/tmp/evil", b"x")], "absolute path", id="absolute"),
        pytest.param(
            [member("tensorrt-rtx/sm_89/transformer.engine", kind=tarfile.SYMTYPE, link="/etc/passwd")],
            "symbolic link",
            id="symlink",
        ),
        pytest.param(
            [member("tensorrt-rtx/sm_89/transformer.engine", kind=tarfile.LNKTYPE, link="x")],
            "hard link",
            id="hardlink",
        ),
        pytest.param(
            [member("tensorrt-rtx/sm_89/transformer.engine", kind=tarfile.CHRTYPE)], "device file", id="device"
        ),
        pytest.param([member("tensorrt-rtx/sm_89/transformer.engine", kind=tarfile.FIFOTYPE)], "FIFO", id="fifo"),
        pytest.param([member("extra.bin", b"x")], "not listed in the manifest", id="extra"),
        pytest.param([member("tensorrt-rtx/sm_89/transformer.engine", b"x")], "bytes but the manifest says", id="size"),
        pytest.param([member("tensorrt-rtx/sm_89", kind=tarfile.SYMTYPE, link="/tmp")], "symbolic link", id="dirlink"),
        pytest.param(
            [member("manifest.json", kind=tarfile.DIRTYPE)], "holds no file the manifest lists", id="dir-over-manifest"
        ),
        pytest.param(
            [member("tensorrt-rtx/sm_89/transformer.engine", kind=tarfile.DIRTYPE)],
            "holds no file the manifest lists",
            id="dir-over-file",
        ),
        pytest.param([member("./tensorrt-rtx/sm_89/transformer.engine", b"x")], "not a plain relative path", id="dot"),
        pytest.param([], "archive lacks 'tensorrt-rtx/sm_89/transformer.engine' listed in the manifest", id="empty"),
    ],
)
def test_unsafe_archive_members(published: Path, tmp_path: Path, members: list[Any], message: str) -> None:
    rewrite_sums(published / KEY, **{"tensorrt__rtx__sm_89.tar": evil_tar(members)})
    out = tmp_path / "o"
    with pytest.raises(DtcError) as err:
        pull_artifact(str(published), out, arch="sm_89")
    assert message in str(err.value)
    assert "\n" not in str(err.value) and str(err.value).endswith(f"nothing was extracted to {out}")
    nothing_left(out)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_duplicate_member(published: Path, art: Path, tmp_path: Path) -> None:
    rel = "tensorrt-rtx/sm_89/transformer.engine"
    data = (art / rel).read_bytes()
    rewrite_sums(published / KEY, **{"tensorrt__rtx__sm_89.tar": evil_tar([member(rel, data), member(rel, data)])})
    with pytest.raises(ArtifactError, match="appears twice"):
        pull_artifact(str(published), tmp_path / "o", arch="sm_89")
    nothing_left(tmp_path / "o")


def test_compressed_or_garbage_archive(published: Path, tmp_path: Path) -> None:
    rewrite_sums(published / KEY, **{"tensorrt__rtx__sm_89.tar": b"\x1f\x8b not a tar at all" * 40})
    with pytest.raises(ArtifactError, match="not a valid uncompressed tar archive"):
        pull_artifact(str(published), tmp_path / "o", arch="sm_89")
    nothing_left(tmp_path / "o")


def test_arch_not_built(published: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(ArtifactError) as err:
        pull_artifact(str(published), out, arch="sm_86")
    assert str(err.value).startswith(
        f"--arch sm_86: no engine was built for it in tiny {KEY[:12]} (published: tensorrt-rtx sm_89, sm_120)"
    )
    nothing_left(out)
    with pytest.raises(ArtifactError, match="no tensorrt engine was built for it"):
        pull_artifact(str(published), out, arch="sm_89", backend="tensorrt")
    nothing_left(out)


def test_missing_archive_in_sums_or_store(published: Path, tmp_path: Path) -> None:
    vdir = published / KEY
    (vdir / "tensorrt-rtx-sm_89.tar").unlink()
    with pytest.raises(ArtifactError, match="tensorrt-rtx-sm_89.tar: not found; the version is incomplete"):
        pull_artifact(str(published), tmp_path / "o", arch="sm_89")
    sums = parse_sums((vdir / SUMS).read_text(), "t")
    del sums["tensorrt-rtx-sm_120.tar"]
    (vdir / SUMS).write_text(format_sums(sums))
    with pytest.raises(VerificationError, match="does not list tensorrt-rtx-sm_120.tar"):
        pull_artifact(str(published), tmp_path / "o", arch="sm_120")
    nothing_left(tmp_path / "o")


def test_malformed_sums(published: Path, tmp_path: Path) -> None:
    (published / KEY / SUMS).write_text("deadbeef  ../../etc/passwd\n")
    with pytest.raises(ArtifactError, match=r"SHA256SUMS:1: not a '<sha256>  <file>' line"):
        pull_artifact(str(published), tmp_path / "o", arch="sm_89")


def test_safe_extract_accepts_folder_members_and_never_overwrites(tmp_path: Path) -> None:
    tar = tmp_path / "x.tar"
    tar.write_bytes(evil_tar([member("a", kind=tarfile.DIRTYPE), member("a/b.txt", b"hi")]))  # as GNU tar writes
    entry = {"file": "a/b.txt", "size": 2, "sha256": hashlib.sha256(b"hi").hexdigest()}
    safe_extract(tar, tmp_path / "dest", [entry])
    assert (tmp_path / "dest/a/b.txt").read_bytes() == b"hi"
    with pytest.raises(ArtifactError, match="cannot extract"):  # never overwrites an existing file
        safe_extract(tar, tmp_path / "dest", [entry])


def test_cli_errors_are_one_line(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtcompile.cli import main

    tar = published / KEY / "tensorrt-rtx-sm_89.tar"
    data = bytearray(tar.read_bytes())
    data[-2000] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["pull", str(published), "--arch", "sm_89", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tensorrt-rtx-sm_89.tar: sha256 does not match SHA256SUMS")
    nothing_left(tmp_path / "o")


def test_cli_pull_prints_what_it_did(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtcompile.cli import main

    main(["pull", str(published), "--arch", "sm_89", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert f"pulled tiny key {KEY[:12]}" in out and "tensorrt-rtx sm_89" in out and "dtc run" in out


# --------------------------------------------------------------------------------------------------------------
# End to end: the real tiny-flux build, published, pulled for sm_89 and run


def test_round_trip_real_build(tmp_path: Path) -> None:
    for module in ("torch", "diffusers", "onnx", "onnxruntime"):
        pytest.importorskip(module)
    from dtcompile.recipe import load_recipe
    from dtcompile.runtime.session import run_artifact
    from dtcompile.stages.runner import run_build

    recipe = load_recipe(REPO / "recipes/tiny-flux.yaml", [f"output.dir={tmp_path / 'engines'}"])
    built = run_build(recipe).artifact_dir
    manifest = read_manifest(built)
    engines = manifest.components["transformer"].engines
    if not any(e.arch == "sm_89" for e in engines):
        pytest.skip(f"the build made no sm_89 engine here: {manifest.to_json().get('skipped')}")
    publish_artifact(built, str(tmp_path / "pub"))
    assert publish_artifact(built, str(tmp_path / "pub")).already
    out = tmp_path / "fresh" / "tiny-flux"
    pull_artifact(str(tmp_path / "pub" / "tiny-flux"), out, arch="sm_89")
    pulled = read_manifest(out)
    for entry in pulled.all_file_entries():
        assert (out / entry.file).read_bytes() == (built / entry.file).read_bytes(), entry.file
    for path in (built / "pipeline").rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(built)).read_bytes() == path.read_bytes()
    assert (out / "tensorrt-rtx/sm_89/transformer.engine").is_file()
    result = run_artifact(out, "a prompt", steps=2, backend="onnxruntime")
    assert result.backend == "onnxruntime" and result.image.size == (64, 64)


def test_refit_files_travel_in_the_common_archive() -> None:
    """A published LoRA artifact stays refittable: its weight map and base weights go with the graph."""
    from dtcompile.tools.publish import plan_archives

    def f(name: str) -> dict:
        return {"file": name, "sha256": "0" * 64, "size": 1}

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny",
        "key": KEY,
        "dtype": "float32",
        "source": {"model": "builtin:tiny", "pipeline_class": "FluxPipeline"},
        "pipeline": {"files": [f("pipeline/model_index.json")]},
        "lora": {"base_store": f("onnx/transformer.lora-base.safetensors")},
        "components": {
            "transformer": {
                "onnx": {**f("onnx/transformer.onnx"), "external_data": []},
                "weight_map": f("onnx/transformer.weights.json"),
                "engines": [
                    {**f("onnx/transformer.onnx"), "backend": "onnxruntime", "arch": "any"},
                    {**f("tensorrt-rtx/sm_89/transformer.engine"), "backend": "tensorrt-rtx", "arch": "sm_89"},
                ],
            }
        },
    }
    common, rtx = plan_archives(Manifest.model_validate(manifest))
    assert {e["file"] for e in common.entries} == {
        "pipeline/model_index.json",
        "onnx/transformer.lora-base.safetensors",
        "onnx/transformer.onnx",
        "onnx/transformer.weights.json",
    }
    assert [e["file"] for e in rtx.entries] == ["tensorrt-rtx/sm_89/transformer.engine"]
