"""Refit: LoRA weights swapped into a built artifact without re-exporting or rebuilding it.

Input: an artifact folder and LoRA adapters (file + scale), or none. Output: a new artifact folder (or the same
one, replaced atomically) whose weights are ``W + sum(scale * alpha/r * B @ A)`` and whose manifest lists the
adapters; the artifact key changes with them.

It rests on two records the build leaves (``dtcompile.weights.weight_map``):

- The weight map (``onnx/<component>.weights.json``): for every torch parameter, the ONNX initializer it became,
  its layout and dtype, and for quantized weights the Q/DQ scale initializer and axis. A refit never needs the
  torch model or a re-export.
- The base store (``refit/<component>.base.safetensors``): the base (LoRA-free) value of every initializer
  any adapter has ever touched, saved the first time it is touched (at build for recipe LoRAs, else at the
  first refit). Every refit recomputes all of them from the base and pushes them all, so ``--lora none``
  restores the base bytes exactly and switching A -> B -> A gives exactly A again (no blending).

Writers: the ONNX graph (inline initializers or its external data, rewritten in a copy) serves onnxruntime;
refittable TensorRT engines are refit by their backend (``Backend.refit``: ``trt.Refitter`` by initializer
name, needs a GPU of the engine's arch); quantized weights are re-quantized with recomputed weight scales (fp8:
amax/448, int8: amax/127 per tensor or per channel) while activation scales stay from calibration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_json
from dtcompile.core.dtypes import dtype_name, torch_dtype
from dtcompile.core.errors import ArtifactError, BuildError, DtcError, UnsupportedError
from dtcompile.core.numerics import dequantize, quantize_weight
from dtcompile.core.targets import REFERENCE_BACKEND
from dtcompile.weights.onnx_weights import OnnxWeights, tensor_bytes
from dtcompile.weights.weight_map import (
    base_store_file,
    load_base_store,
    load_weight_map,
    relayout,
    save_base_store,
    targets,
)

if TYPE_CHECKING:
    from dtcompile.stages.lora import LoraWeights, ResolvedLora

log = logging.getLogger("dtcompile.refit")


# --- LoRA -> initializer updates ------------------------------------------------------------------------------------


@dataclass
class RefitPlan:
    """What a refit writes: new values per initializer and the base store after it."""

    updates: dict[str, Any]
    base_store: dict[str, Any]
    touched: list[str]
    computed: list[str] = field(default_factory=list)  # parameters recomputed from adapters (others: base)


def _entry(wmap: dict[str, Any], param: str, label: str) -> dict[str, Any]:
    e = wmap["params"].get(param)
    if e is None:
        raise ArtifactError(f"{label}: parameter '{param}' is not in the artifact's weight map")
    if "initializer" not in e and e.get("status") != "unread":  # unread: a delta on it changes nothing
        raise UnsupportedError(
            f"{label}: cannot refit '{param}': {e.get('status')} in the exported graph ({e.get('reason')}); "
            "fuse this LoRA with dtc build instead (lora: in the recipe)"
        )
    return e


def _without_unread(
    entries: dict[str, dict[str, Any]], touched: list[str], active: list[tuple[LoraWeights, float]]
) -> tuple[list[str], list[str], list[tuple[LoraWeights, float]]]:
    """``touched``, the parameters the ``active`` adapters touch now (sorted) and those adapters, all without the
    family's unread parameters (``_entry`` lets only those through without an initializer:
    ``ModelAdapter.unread_params``): the graph has no place for their deltas, and they change nothing."""
    unread = {p for p, e in entries.items() if "initializer" not in e}
    if unread:
        modules = {p.rpartition(".")[0] for p in unread}
        active = [(dataclasses.replace(w, modules={m: f for m, f in w.modules.items() if m not in modules}), s)
                  for w, s in active]  # fmt: skip
    now = sorted({p for w, _ in active for p in w.params()})
    return [p for p in touched if p not in unread], now, active


def plan_refit(
    wmap: dict[str, Any],
    graph: OnnxWeights,
    base_store: dict[str, Any],
    ever_touched: list[str],
    loras: list[tuple[LoraWeights, float]],
) -> RefitPlan:
    """New initializer values for every parameter any adapter has ever touched.

    Parameters touched by a current adapter (non-zero scale) are recomputed: base (dequantized if needed, in
    torch layout) plus the updates in adapter order, then back to the engine's layout, dtype and quantization.
    Every other parameter in ``ever_touched`` gets its stored base bytes back unchanged.
    """
    from dtcompile.stages.lora import apply_deltas, check_fused_finite

    touched = sorted(set(ever_touched) | {p for w, _ in loras for p in w.params()})
    store = dict(base_store)
    entries = {p: _entry(wmap, p, "refit") for p in touched}
    touched, now, active = _without_unread(entries, touched, [(w, s) for w, s in loras if s != 0.0])

    def base_of(name: str) -> Any:
        if name not in store:  # first touch: the artifact still holds the base value
            store[name] = graph.tensor(name)
        return store[name]

    updates: dict[str, Any] = {}
    torch_base: dict[str, Any] = {}
    for p in touched:
        e = entries[p]
        init, layout = e["initializer"], e["layout"]
        q = e.get("quant")
        fresh = init not in store
        stored = base_of(init)
        if q and fresh and q["scale"] in graph.inits:
            base_of(q["scale"])  # the pristine weight and its calibrated scale are stored as a pair
        if q and q.get("zero_point") and graph.tensor(q["zero_point"]).count_nonzero():
            raise UnsupportedError(f"refit: '{p}' is quantized with a non-zero zero point (asymmetric)")
        if p not in now:  # untouched now: the base bytes go back exactly
            if q and q["scale"] not in store:  # a float base without a calibrated scale: quantize it
                updates[init], updates[q["scale"]] = _requantize(stored, e, graph)
            else:
                updates[init] = stored
                if q:
                    updates[q["scale"]] = store[q["scale"]]
            for copy, copy_layout in targets(e)[1:]:
                updates[copy] = relayout(stored, layout, copy_layout)
            continue
        if q and dtype_name(stored.dtype) == q["qdtype"]:
            w = dequantize(stored, store[q["scale"]], q["axis"])
        else:
            w = stored.float() if q else stored
        torch_base[p] = w.t() if layout == "transposed" else w
    new = apply_deltas(torch_base, active)
    # before anything is written: an overflow (scale 1e39, factors x1e30) in the engine's dtype is refused
    check_fused_finite(
        new, active, {p: torch_dtype(entries[p]["onnx_dtype"]) for p in new if not entries[p].get("quant")}
    )
    for p, w in new.items():
        e = entries[p]
        w = w.t().contiguous() if e["layout"] == "transposed" else w.contiguous()
        init = e["initializer"]
        if e.get("quant"):
            updates[init], updates[e["quant"]["scale"]] = _requantize(w, e, graph)
        else:
            updates[init] = w.to(torch_dtype(e["onnx_dtype"]))
        for copy, copy_layout in targets(e)[1:]:
            updates[copy] = relayout(updates[init], e["layout"], copy_layout)
    return RefitPlan(updates=updates, base_store=store, touched=touched, computed=now)


def _requantize(w: Any, e: dict[str, Any], graph: OnnxWeights) -> tuple[Any, Any]:
    q = e["quant"]
    scale_dtype = torch_dtype(graph.dtype(q["scale"]) or "float32")
    q_new, s_new = quantize_weight(w, q["qdtype"], q["axis"], scale_dtype)
    s_new = s_new.reshape(graph.dims(q["scale"]))
    if q["kind"] == "qdq":  # the graph quantizes the float weight itself: keep it float, update the scale
        return w.to(torch_dtype(e["onnx_dtype"])), s_new
    return q_new, s_new


# --- writers --------------------------------------------------------------------------------------------------------


def overlay_file(onnx_name: str) -> str:
    """The external data file a refit writes its initializers to, next to the graph."""
    return f"{onnx_name}.refit.data"


def rewrite_onnx(src: Path, dst: Path, updates: dict[str, Any]) -> dict[str, str]:
    """Write a copy of the graph ``src`` to ``dst`` with ``updates`` (initializer name -> tensor) applied.

    Graphs with external data: the updated initializers go to one new external file (``overlay_file``) and the
    graph's other data files are hard-linked unchanged (cost: the touched tensors and the small .onnx file).
    Graphs with inline weights: the .onnx file is copied and each raw_data patched in place at its offset (no
    protobuf parse or serialization). Shapes and dtypes must not change.

    Returns every file of the new graph by name (they sit next to ``dst``): "written" or "linked" (unchanged).
    """
    import onnx

    graph = OnnxWeights(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, bytes | bytearray] = {}
    for name, value in updates.items():
        if name not in graph.inits:
            raise ArtifactError(f"{src}: no initializer '{name}' (the weight map does not match the graph)")
        if tuple(value.shape) != graph.dims(name) or graph.dtype(name) != dtype_name(value.dtype):
            raise BuildError(
                f"refit: new value of '{name}' is {value.dtype} {list(value.shape)}, the graph holds "
                f"{graph.dtype(name)} {list(graph.dims(name))}"
            )
        data[name] = tensor_bytes(value)
    overlay = overlay_file(dst.name)
    external = {n: e for n in graph.inits if (e := graph.external(n)) is not None}
    files: dict[str, str] = {}
    if not external:  # inline weights: patch a copy of the file
        shutil.copyfile(src, dst)
        with open(dst, "r+b") as f:
            for name, raw in data.items():
                span = graph.inits[name].raw
                if span is None or span[1] != len(raw):
                    raise BuildError(f"refit: '{name}' is not stored as {len(raw)} bytes of raw_data; rebuild")
                f.seek(span[0])
                f.write(raw)
        files[dst.name] = "written"
        return files

    # Tensors still in a previous refit's overlay move to the new one with their bytes.
    for name, (path, _, _) in external.items():
        if path.name == overlay and name not in data:
            data[name] = graph.raw(name)
    model = graph.model
    offset = 0
    with open(dst.parent / overlay, "wb") as out:
        for t in model.graph.initializer:
            if t.name not in data:
                continue
            raw = data[t.name]
            out.write(raw)
            for field_name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field_name)
            del t.external_data[:]
            for key, value in (("location", overlay), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += len(raw)
            pad = -offset % 64  # aligned like the export's data file
            out.write(b"\0" * pad)
            offset += pad
    for name in sorted({path.name for n, (path, _, _) in external.items() if n not in data} - {overlay}):
        _link_or_copy(src.parent / name, dst.parent / name)
        files[name] = "linked"
    files[overlay] = "written"
    onnx.save_model(model, str(dst))
    files[dst.name] = "written"
    return files


# --- engines: what can be refit here --------------------------------------------------------------------------------


def engine_blocker(entry: dict[str, Any], gpu: str | None) -> str | None:
    """Why a manifest engine entry cannot be refit on this machine (None: it can)."""
    backend, arch = entry["backend"], entry["arch"]
    if backend == REFERENCE_BACKEND:
        return None
    if not entry.get("refittable"):
        return (
            f"{backend} {arch} engine is not refittable (built with engine.refittable: false); rebuild with "
            "engine.refittable: true, which needs a CUDA GPU at build time, or fuse the LoRA with dtc build"
        )
    if gpu is None:
        return f"refitting the {backend} {arch} engine needs a CUDA GPU of that arch and this machine has none"
    if gpu != arch:
        return f"refitting the {backend} {arch} engine needs a {arch} GPU (this one is {gpu})"
    return None


# --- the whole refit --------------------------------------------------------------------------------------------------


@dataclass
class RefitReport:
    """What ``refit_artifact`` wrote."""

    artifact_dir: Path
    manifest: dict[str, Any]
    adapters: list[dict[str, Any]]
    updated: int
    touched: int
    refit_engines: list[str]
    dropped: list[dict[str, str]]
    seconds: float
    timings: dict[str, float]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # every later writer replaces files by rename, so sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)


def _new_key(
    base_key: str,
    built_with: list[dict[str, Any]],
    adapters: list[dict[str, Any]],
    dropped: list[dict[str, str]] | None = None,
) -> str:
    """The refit artifact's key: the base key when its weights are the base bytes again and every engine the
    build made is still there; else a hash of the base key, the adapters and the engines dropped so far (so a
    rebuild of the recipe into the folder is never "up to date" over a missing engine)."""
    if not adapters and not built_with and not dropped:
        return base_key  # all weights are the base bytes again: the artifact is the one that was built
    lora = [[a["sha256"], a["scale"], *([a["component"]] if a.get("component") else [])] for a in adapters]
    payload: dict[str, Any] = {"refit_of": base_key, "lora": lora}
    if dropped:
        payload["dropped"] = sorted([d.get("component", ""), d["backend"], d["arch"]] for d in dropped)
    return sha256_json(payload)


def check_lora_scale(path: str, scale: float) -> None:
    """DtcError unless ``scale`` is a finite number within ``recipe.schema.LORA_SCALE_MAX`` (the recipe's range)."""
    import math

    from dtcompile.recipe.schema import LORA_SCALE_MAX

    if not math.isfinite(scale):
        raise DtcError(f"LoRA {path}: the scale must be a finite number, got {scale}")
    if abs(scale) > LORA_SCALE_MAX:
        raise DtcError(
            f"LoRA {path}: the scale {scale:g} is outside -{LORA_SCALE_MAX:g}..{LORA_SCALE_MAX:g} (typical: 0.5 to "
            "1.5); pass a smaller scale"
        )


def _destination(artifact_dir: Path, out_dir: Path | None, in_place: bool) -> Path:
    """Where the refit artifact goes (``artifact_dir`` itself when in place); DtcError for a bad choice."""
    if in_place and out_dir is not None and Path(out_dir).resolve() != artifact_dir.resolve():
        raise DtcError("give either --out DIR or --in-place, not both")
    if not in_place and out_dir is None:
        raise DtcError("refit needs --out DIR (a new artifact) or --in-place (replace this one atomically)")
    dest = artifact_dir if in_place else Path(out_dir)  # type: ignore[arg-type]
    if dest.resolve() == artifact_dir.resolve():
        return dest
    if dest.exists() and any(dest.iterdir()) and not (dest / "manifest.json").is_file():
        raise DtcError(f"--out {dest}: folder exists and is not a dtc artifact; choose an empty or new folder")
    return dest


def refit_components(artifact_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The denoiser graphs of a fully built artifact, the main one first (ArtifactError / UnsupportedError)."""
    if manifest.get("stopped_after"):
        raise ArtifactError(
            f"{artifact_dir}: artifact stopped after stage '{manifest['stopped_after']}'; build it fully first"
        )
    comps = manifest["components"]
    # the denoisers' graphs; engine-backed text encoders and VAE decoder (their "role") are carried over as built
    graphs = [name for name, c in comps.items() if not c.get("role")]
    split = [name for name in graphs if comps[name].get("parts") or comps[name].get("part_of")]
    if split or not graphs:
        raise UnsupportedError(
            f"{artifact_dir}: refit takes artifacts whose denoisers are whole graphs; this one has "
            f"{', '.join(graphs) or 'none'} (a block-cached build): put the LoRA in the recipe's lora: section "
            "and rebuild"
        )
    return graphs


def lora_state(lora: dict[str, Any], comp: str, main: str) -> dict[str, Any]:
    """A denoiser's LoRA state in the manifest's ``lora`` section: the main one's at the top, others' under
    ``components``."""
    return lora if comp == main else (lora.get("components") or {}).get(comp, {})


def _blocked_engines(centry: dict[str, Any], drop_unrefittable: bool) -> list[tuple[dict[str, Any], str]]:
    """Engines that cannot be refit on this machine, with the reason; decided before reading any weights.

    Raises UnsupportedError naming the first unless ``drop_unrefittable`` (then they are left out)."""
    from dtcompile.core.targets import gpu_arch

    gpu = gpu_arch()
    found = [(e, r) for e in centry["engines"] if (r := engine_blocker(e, gpu))]
    if found and not drop_unrefittable:
        e, reason = found[0]
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        raise UnsupportedError(f"{reason}{more}; or pass --drop-unrefittable to leave such engines out")
    return found


@contextlib.contextmanager
def artifact_data(centry: dict[str, Any], comp: str) -> Iterator[None]:
    """Inside: reading ``comp``'s weight map and LoRA base store (whose hashes matched a manifest that may have
    been edited with them); a malformed one is one ArtifactError naming the file, never an internal error."""
    from safetensors import SafetensorError

    try:
        yield
    except DtcError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, SafetensorError) as exc:
        wmap = (centry.get("weight_map") or {}).get("file", "weight map") if isinstance(centry, dict) else "weight map"
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ArtifactError(
            f"{wmap} ({comp}'s weight map or LoRA base store): malformed, {type(exc).__name__} {first}; the artifact "
            "was changed after it was built: rebuild it with dtc build or pull it again"
        ) from None


def read_weight_map(artifact_dir: Path, centry: dict[str, Any], comp: str) -> dict[str, Any]:
    with artifact_data(centry, comp):
        wmap = load_weight_map(artifact_dir, centry, comp)
        if not isinstance(wmap.get("params"), dict):
            raise TypeError("its 'params' is not a mapping")
        return wmap


def read_adapters(
    resolved: list[ResolvedLora], wmap: dict[str, Any], pipeline_class: str, comp: str, main: str
) -> list[LoraWeights]:
    """Parse and check the adapters of denoiser ``comp`` against its weight map, before anything is written.
    Adapter files name the main denoiser (``main``), whichever expert they go into."""
    from dtcompile.stages.lora import check_lora_fits, read_lora

    shapes = {p: tuple(e["shape"]) for p, e in wmap["params"].items()}
    parsed = [read_lora(r, pipeline_class, main) for r in resolved]
    for w in parsed:
        check_lora_fits(w, shapes, f"the artifact's {comp}")
        for p in w.params():
            _entry(wmap, p, w.label)
    return parsed


@dataclass
class _Job:
    """One refit in progress: the source artifact, the temp folder it is assembled in, and what goes there."""

    artifact_dir: Path
    tmp: Path
    manifest: dict[str, Any]
    comp: str
    plan: RefitPlan
    graph: OnnxWeights
    blocked: list[tuple[dict[str, Any], str]]
    base_store: dict[str, Any] = field(default_factory=dict)  # the stored base values the refit started from

    @property
    def centry(self) -> dict[str, Any]:
        return self.manifest["components"][self.comp]

    @property
    def onnx_rel(self) -> str:
        return self.centry["onnx"]["file"]

    @property
    def dropped_files(self) -> set[str]:
        return {e["file"] for e, _ in self.blocked}

    def trt_entries(self) -> list[dict[str, Any]]:
        """The engines a backend refits (every kept engine but onnxruntime's, which is the ONNX graph)."""
        return [
            e
            for e in self.centry["engines"]
            if e["backend"] != REFERENCE_BACKEND and e["file"] not in self.dropped_files
        ]


def _rewritten(job: _Job) -> set[str]:
    """The files of ``job``'s denoiser the refit writes anew (or drops)."""
    onnx_rel, centry = job.onnx_rel, job.centry
    out = {Path(onnx_rel).as_posix()} | {x["file"] for x in centry["onnx"].get("external_data", [])}
    out.add((Path(onnx_rel).parent / overlay_file(Path(onnx_rel).name)).as_posix())
    return out | job.dropped_files | {e["file"] for e in job.trt_entries()} | {base_store_file(job.comp)}


def _copy_unchanged(jobs: list[_Job]) -> None:
    """Hard-link (or copy) into the temp folder every file the refit does not rewrite."""
    from dtcompile.manifest import all_file_entries

    first = jobs[0]
    skip = {"manifest.json"}.union(*(_rewritten(j) for j in jobs))
    # Only what the manifest lists (and verify_file checked) is carried over; stray files stay behind.
    for rel in sorted({e["file"] for e in all_file_entries(first.manifest)} - skip):
        _link_or_copy(first.artifact_dir / rel, first.tmp / rel)


def _graph_weights(graph: OnnxWeights) -> Callable[[str], Any]:
    """``missing(name)`` for ``Backend.refit``: a weight TensorRT asks for, read from the refit ONNX graph."""

    def missing(name: str) -> Any:
        if name not in graph.inits:
            raise BuildError(f"refit: TensorRT needs weight '{name}', which the ONNX graph does not hold")
        return graph.tensor(name)

    return missing


def _refit_engines(job: _Job, new_onnx_entry: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The new manifest engine entries (dropped ones left out) and the ``backend:arch`` of each engine refit."""
    from dtcompile.backends import get_backend

    new_graph = OnnxWeights(job.tmp / job.onnx_rel) if job.trt_entries() else job.graph
    missing = _graph_weights(new_graph)
    refit_done: list[str] = []
    new_engines: list[dict[str, Any]] = []
    for e in job.centry["engines"]:
        if e["file"] in job.dropped_files:
            continue
        if e["backend"] == REFERENCE_BACKEND:
            new_engines.append({**e, **{k: v for k, v in new_onnx_entry.items() if k != "file"}})
            continue
        backend = get_backend(e["backend"])
        info = backend.refit(job.artifact_dir / e["file"], job.plan.updates, job.tmp / e["file"], missing=missing)
        new_engines.append({**e, **info})
        refit_done.append(f"{e['backend']}:{e['arch']}")
    return new_engines, refit_done


def _write_base_store(job: _Job) -> None:
    store_rel = base_store_file(job.comp)
    base_store = job.base_store
    if base_store and set(job.plan.base_store) == set(base_store):  # nothing newly touched: the base is unchanged
        _link_or_copy(job.artifact_dir / store_rel, job.tmp / store_rel)
    else:
        save_base_store(job.plan.base_store, job.tmp / store_rel)


def _onnx_entry(job: _Job, new_onnx_entry: dict[str, Any], graph_files: dict[str, str]) -> dict[str, Any]:
    """The manifest's ``onnx`` entry of the rewritten graph (unchanged linked data files keep their entries)."""
    from dtcompile.manifest import file_entry

    onnx_rel, centry = job.onnx_rel, job.centry
    onnx_entry = {**centry["onnx"], **new_onnx_entry}
    old_entries = {x["file"]: x for x in centry["onnx"].get("external_data", [])}
    onnx_entry["external_data"] = []
    for name, how in sorted(graph_files.items()):
        rel = (Path(onnx_rel).parent / name).as_posix()
        if rel == Path(onnx_rel).as_posix():
            continue
        linked = how == "linked" and rel in old_entries  # unchanged bytes: no need to hash them again
        onnx_entry["external_data"].append(old_entries[rel] if linked else file_entry(job.tmp, job.tmp / rel))
    return onnx_entry


@dataclass
class _Written:
    """One job's output: its manifest ``onnx`` entry, engine entries and the engines refit."""

    onnx_entry: dict[str, Any]
    engines: list[dict[str, Any]]
    refit_done: list[str]


def _engine_names(jobs: list[_Job], written: list[_Written], *, with_graphs: bool) -> list[str]:
    """``backend:arch`` of every engine refit (with each denoiser's onnxruntime graph first when
    ``with_graphs``), prefixed by the denoiser when the refit wrote several."""
    names = []
    for job, out in zip(jobs, written, strict=True):
        for engine in ["onnxruntime:any"] * with_graphs + out.refit_done:
            names.append(f"{job.comp} {engine}" if len(jobs) > 1 else engine)
    return names


def _new_manifest(
    jobs: list[_Job], written: list[_Written], adapters: list[dict[str, Any]], main: str, seconds: float
) -> dict[str, Any]:
    """The refit artifact's manifest: new graphs and engines, skipped engines, key and ``lora`` section."""
    from dtcompile.manifest import file_entry

    manifest = jobs[0].manifest
    old_lora = manifest.get("lora") or {}
    new_manifest = json.loads(json.dumps(manifest))
    dropped: list[dict[str, str]] = []
    lora: dict[str, Any] = {}
    if old_lora.get("components"):  # experts this refit did not touch keep their state
        lora["components"] = dict(old_lora["components"])
    for job, out in zip(jobs, written, strict=True):
        nc = new_manifest["components"][job.comp]
        nc["onnx"] = out.onnx_entry
        nc["engines"] = out.engines
        here = [{"backend": e["backend"], "arch": e["arch"], "reason": r} for e, r in job.blocked]
        dropped += [{**d, "component": job.comp} for d in here] if len(jobs) > 1 else here
        state = {"touched": job.plan.touched, "base_store": file_entry(job.tmp, job.tmp / base_store_file(job.comp))}
        if job.comp == main:
            lora.update(state)
        else:
            lora.setdefault("components", {})[job.comp] = state
    new_manifest["skipped"] = [*manifest.get("skipped", []), *dropped]
    built_with = old_lora.get("built_with", [])
    base_key = old_lora.get("base_key", manifest["key"])
    # every engine a refit of this build has dropped (this one and earlier ones): the key covers which exist
    gone = [*old_lora.get("dropped_engines", []), *({"component": job.comp, "backend": e["backend"],
            "arch": e["arch"]} for job in jobs for e, _ in job.blocked)]  # fmt: skip
    new_manifest["key"] = _new_key(base_key, built_with, adapters, gone)
    new_manifest["lora"] = {
        "adapters": adapters,
        "built_with": built_with,
        "base_key": base_key,
        **({"dropped_engines": gone} if gone else {}),
        **lora,
        "refit": {
            "updated_initializers": sum(len(j.plan.updates) for j in jobs),
            "recomputed_parameters": sum(len(j.plan.computed) for j in jobs),
            "engines": _engine_names(jobs, written, with_graphs=True),
            "dropped": dropped,
            "wall_s": round(seconds, 3),
        },
    }
    return new_manifest


def _write_job(job: _Job, timings: dict[str, float]) -> _Written:
    """Rewrite one denoiser's graph, refit its engines and write its base store into ``job.tmp``."""
    from dtcompile.manifest import file_entry

    t0 = time.perf_counter()
    new_onnx = job.tmp / job.onnx_rel
    graph_files = rewrite_onnx(job.artifact_dir / job.onnx_rel, new_onnx, job.plan.updates)
    new_onnx_entry = file_entry(job.tmp, new_onnx)
    timings["write_onnx_s"] = timings.get("write_onnx_s", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    new_engines, refit_done = _refit_engines(job, new_onnx_entry)
    timings["refit_engines_s"] = timings.get("refit_engines_s", 0.0) + time.perf_counter() - t0
    _write_base_store(job)
    return _Written(_onnx_entry(job, new_onnx_entry, graph_files), new_engines, refit_done)


def _assemble(
    jobs: list[_Job], adapters: list[dict[str, Any]], main: str, t_start: float, timings: dict[str, float]
) -> tuple[dict[str, Any], list[str]]:
    """Write the refit artifact into the jobs' temp folder (manifest last); returns its manifest and the
    engines refit."""
    from dtcompile.manifest import write_manifest

    _copy_unchanged(jobs)
    written = [_write_job(job, timings) for job in jobs]
    new_manifest = _new_manifest(jobs, written, adapters, main, time.perf_counter() - t_start)
    write_manifest(jobs[0].tmp, new_manifest)
    return new_manifest, _engine_names(jobs, written, with_graphs=False)


def _read_loras(
    artifact_dir: Path,
    manifest: dict[str, Any],
    comps: list[str],
    specs: list[tuple[str, float, str | None]],
    drop_unrefittable: bool,
) -> tuple[dict[int, ResolvedLora], dict[int, LoraWeights], list[tuple[Any, ...]]]:
    """(resolved, parsed, work): each spec's resolved file and parsed adapter (by index into ``specs``), and per
    denoiser to refit (comp, entry, weight map, LoRA state, blocked engines, its spec indices); a denoiser no
    adapter ever touched is left out (carried over as built)."""
    from dtcompile.stages.lora import resolve_lora

    main = comps[0]
    old_lora = manifest.get("lora") or {}
    pipeline_class = manifest["source"]["pipeline_class"]
    resolved: dict[int, ResolvedLora] = {}
    parsed: dict[int, LoraWeights] = {}
    work = []
    for comp in comps:
        mine = [i for i, (_, _, c) in enumerate(specs) if (c or main) == comp]
        state = lora_state(old_lora, comp, main)
        if comp != main and not mine and not state.get("touched"):
            continue  # never touched by an adapter: carried over as built
        centry = manifest["components"][comp]
        wmap = read_weight_map(artifact_dir, centry, comp)
        blocked = _blocked_engines(centry, drop_unrefittable)  # before any adapter file is read
        for i in mine:
            src, scale, c = specs[i]
            resolved[i] = resolve_lora(src, None, scale, "--lora", component=c)
        with artifact_data(centry, comp):
            got = read_adapters([resolved[i] for i in mine], wmap, pipeline_class, comp, main)
        parsed.update(zip(mine, got, strict=True))
        work.append((comp, centry, wmap, state, blocked, mine))
    return resolved, parsed, work


def refit_artifact(
    artifact_dir: Path,
    loras: Sequence[tuple[str, float] | tuple[str, float, str | None]],
    *,
    out_dir: Path | None = None,
    in_place: bool = False,
    drop_unrefittable: bool = False,
) -> RefitReport:
    """Swap ``loras`` ((path, scale) or (path, scale, denoiser) tuples; empty = base weights) into the
    artifact at ``artifact_dir``. The denoiser defaults to the main one; Wan2.2's low-noise expert is
    ``transformer_2``. A denoiser given no adapter gets its base weights back.

    Everything is checked (engines refittable here, adapter files, keys, ranks, shapes) before anything is
    written; the result is assembled in a temp folder next to the destination and renamed into place.

    Raises:
        ArtifactError, UnsupportedError, RecipeError: one line naming what is wrong and the fix.
    """

    from dtcompile.core.files import collect_stale, discarded_on_failure, make_temp_dir, replace_dir
    from dtcompile.manifest import Verifier, read_manifest, verify_file

    specs = [(str(x[0]), float(x[1]), x[2] if len(x) > 2 else None) for x in loras]
    for path, scale, _ in specs:
        check_lora_scale(path, scale)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    artifact_dir = Path(artifact_dir)
    dest = _destination(artifact_dir, out_dir, in_place)
    typed = read_manifest(artifact_dir)
    # Everything the refit reads or carries over is checked first: a tampered file is refused, never laundered
    # into a copy with fresh hashes.
    for entry in typed.all_file_entries():
        verify_file(artifact_dir, entry, full=True)
    manifest = typed.to_json()  # plain dicts: the refit edits a copy of them
    comps = refit_components(artifact_dir, manifest)
    main = comps[0]
    for path, _, comp in specs:
        if comp is not None and comp not in comps:
            raise DtcError(f"--lora {path}@{comp}: the artifact's denoisers are {', '.join(comps)}")

    t0 = time.perf_counter()
    resolved, parsed, work = _read_loras(artifact_dir, manifest, comps, specs, drop_unrefittable)
    timings["read_loras_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tmp_jobs = []
    for comp, centry, wmap, state, blocked, mine in work:
        graph = OnnxWeights(artifact_dir / centry["onnx"]["file"])
        weights = [(parsed[i], resolved[i].scale) for i in mine]
        with artifact_data(centry, comp):
            base_store = load_base_store(artifact_dir, state)
            plan = plan_refit(wmap, graph, base_store, list(state.get("touched", [])), weights)
        tmp_jobs.append((comp, plan, graph, blocked, base_store))
    timings["compute_s"] = time.perf_counter() - t0

    adapters = [{**resolved[i].record(), **parsed[i].summary()} for i in range(len(specs))]
    dest.parent.mkdir(parents=True, exist_ok=True)
    for line in collect_stale(dest):
        log.warning("refit: %s", line)
    tmp = make_temp_dir(dest, "refit")
    jobs = [_Job(artifact_dir, tmp, manifest, c, p, g, b, store) for c, p, g, b, store in tmp_jobs]
    with discarded_on_failure(tmp, dest):
        new_manifest, refit_done = _assemble(jobs, adapters, main, t_start, timings)
        replace_dir(tmp, dest)
    Verifier(dest).record_written(read_manifest(dest).all_file_entries())
    timings["total_s"] = time.perf_counter() - t_start
    updated = sum(len(j.plan.updates) for j in jobs)
    log.info(
        "refit %s -> %s: %d adapter(s), %d initializers in %.2f s",
        artifact_dir,
        dest,
        len(adapters),
        updated,
        timings["total_s"],
    )
    return RefitReport(
        artifact_dir=dest,
        manifest=new_manifest,
        adapters=adapters,
        updated=updated,
        touched=sum(len(j.plan.touched) for j in jobs),
        refit_engines=refit_done,
        dropped=new_manifest["lora"]["refit"]["dropped"],
        seconds=timings["total_s"],
        timings=timings,
    )
