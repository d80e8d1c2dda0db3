"""Refit: LoRA weights swapped into a built artifact without re-exporting or rebuilding it.

Input: an artifact folder and LoRA adapters (file + scale), or none. Output: a new artifact folder (or the same
one, replaced atomically) whose weights are ``W + sum(scale * alpha/r * B @ A)`` and whose manifest lists the
adapters; the artifact key changes with them.

Three pieces:

- The weight map (``build_weight_map``), recorded once at export into ``onnx/<component>.weights.json``:
  for every torch parameter, the ONNX initializer it became, its layout (``same`` or ``transposed``: the
  legacy exporter folds Linear weights into pre-transposed ``onnx::MatMul_N`` constants) and dtype, and for
  quantized weights the Q/DQ scale initializer and axis. Float weights are matched by content (sha256 of the
  bytes in both layouts), which survives renaming and constant folding; ties between equal tensors are broken
  by name and by the consuming node's module scope. Quantized weights (int8/fp8 initializers read through a
  DequantizeLinear) are matched by scope and shape. A refit never needs the torch model or a re-export.
- The base store (``refit/<component>.base.safetensors``): the base (LoRA-free) value of every initializer
  any adapter has ever touched, saved the first time it is touched (at build for recipe LoRAs, else at the
  first refit). Every refit recomputes all of them from the base and pushes them all, so ``--lora none``
  restores the base bytes exactly and switching A -> B -> A gives exactly A again (no blending).
- Writers: the ONNX graph (inline initializers or its external data, rewritten in a copy) serves onnxruntime;
  refittable TensorRT engines are refit with ``trt.Refitter`` by initializer name (needs a GPU of the
  engine's arch); quantized weights are re-quantized with recomputed weight scales (fp8: amax/448, int8:
  amax/127 per tensor or per channel) while activation scales stay from calibration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_json
from dtcompile.core.errors import ArtifactError, BuildError, DtcError, UnsupportedError
from dtcompile.core.numerics import QMAX, dequantize, quantize_weight

if TYPE_CHECKING:
    import onnx
    import torch

    from dtcompile.stages.lora import FusedLoras, LoraWeights, ResolvedLora

log = logging.getLogger("dtcompile.refit")

WEIGHT_MAP_VERSION = 1
#: ONNX element type -> torch dtype name (the types a weight or a Q/DQ scale can have).
_ONNX_TORCH = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    10: "float16",
    11: "float64",
    16: "bfloat16",
    17: "float8_e4m3fn",
    19: "float8_e5m2",
}
#: Quantized weight dtypes -> largest representable magnitude (the scale is amax / this).
_DQ_OPS = ("DequantizeLinear",)
_Q_OPS = ("QuantizeLinear",)


def weight_map_file(component: str) -> str:
    return f"onnx/{component}.weights.json"


def base_store_file(component: str) -> str:
    return f"refit/{component}.base.safetensors"


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in row-major order (as ONNX raw_data stores them)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- random access to an ONNX graph's weights -------------------------------------------------------------------


@dataclass
class _TensorIndex:
    """Where an initializer's data sits, read from the protobuf wire format without parsing the model."""

    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None  # (offset, length) of raw_data inside the .onnx file
    external: dict[str, str] = field(default_factory=dict)  # location/offset/length when stored externally
    typed: bool = False  # values in typed fields (float_data, ...) instead of raw_data


def _varint(buf: Any, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Any:
    """(field number, wire type, value or (start, end)) of each field of one protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield num, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            yield num, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield num, wire, (i, i + n)
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _scan_initializers(buf: Any) -> dict[str, _TensorIndex]:
    """ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto fields: dims 1, data_type 2,
    name 8, raw_data 9, external_data 13 (key 1 / value 2), typed data 4-7, 10, 11."""
    out: dict[str, _TensorIndex] = {}
    for num, wire, graph in _fields(buf, 0, len(buf)):
        if num != 7 or wire != 2:
            continue
        for gnum, gwire, span in _fields(buf, *graph):
            if gnum != 5 or gwire != 2:
                continue
            name, dims, dtype, raw, ext, typed = "", [], 0, None, {}, False
            for tnum, twire, v in _fields(buf, *span):
                if tnum == 1:
                    if twire == 0:
                        dims.append(v)
                    else:  # packed
                        j, stop = v
                        while j < stop:
                            d, j = _varint(buf, j)
                            dims.append(d)
                elif tnum == 2:
                    dtype = v
                elif tnum == 8:
                    name = bytes(buf[v[0] : v[1]]).decode()
                elif tnum == 9:
                    raw = (v[0], v[1] - v[0])
                elif tnum == 13:
                    key = value = ""
                    for enum, _, ev in _fields(buf, *v):
                        text = bytes(buf[ev[0] : ev[1]]).decode()
                        key, value = (text, value) if enum == 1 else (key, text)
                    ext[key] = value
                elif tnum in (4, 5, 6, 7, 10, 11):
                    typed = True
            out[name] = _TensorIndex(tuple(dims), dtype, raw, ext, typed)
    return out


class OnnxWeights:
    """An ONNX graph whose initializers are read one at a time (inline or external data), as torch tensors.

    Opening one indexes the initializers from the protobuf wire format (memory-mapped, no parse): a refit of a
    multi-GB graph reads only the tensors it touches. ``model`` (the parsed graph, external data not loaded)
    is loaded on first use.
    """

    def __init__(self, onnx_path: Path) -> None:
        import mmap

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: ONNX file not found; rebuild or re-pull the artifact")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                self.inits: dict[str, _TensorIndex] = _scan_initializers(buf)
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise ArtifactError(f"{self.path}: not a readable ONNX file ({exc})") from None
        self._model: Any = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            import onnx

            self._model = onnx.load(str(self.path), load_external_data=False)
        return self._model

    def proto(self, name: str) -> onnx.TensorProto:
        return next(t for t in self.model.graph.initializer if t.name == name)

    def dtype(self, name: str) -> str | None:
        return _ONNX_TORCH.get(self.inits[name].data_type)

    def dims(self, name: str) -> tuple[int, ...]:
        return self.inits[name].dims

    def external(self, name: str) -> tuple[Path, int, int] | None:
        """(data file, offset, length) of an external initializer, None when it is inline."""
        ext = self.inits[name].external
        if "location" not in ext:
            return None
        path = self.path.parent / ext["location"]
        offset = int(ext.get("offset", 0))
        length = int(ext["length"]) if "length" in ext else path.stat().st_size - offset
        return path, offset, length

    def raw(self, name: str) -> bytearray:
        """The initializer's bytes as raw_data stores them (a fresh buffer the caller owns)."""
        idx = self.inits[name]
        ext = self.external(name)
        path, offset, length = ext if ext is not None else (self.path, *(idx.raw or (0, 0)))
        if ext is None and idx.raw is None:
            if not idx.typed:
                return bytearray()
            from onnx import numpy_helper

            return bytearray(numpy_helper.to_array(self.proto(name)).tobytes())  # typed fields (float_data, ...)
        data = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(data)
        if got != length:
            raise ArtifactError(f"{path}: data of '{name}' is truncated; rebuild or re-pull the artifact")
        return data

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        dtype = self.dtype(name)
        if dtype is None:
            raise UnsupportedError(f"{self.path}: initializer '{name}' has an element type refit cannot handle")
        data = self.raw(name)
        dims = self.dims(name)
        if not data:
            return torch.empty(dims, dtype=_torch_dtype(dtype))
        return torch.frombuffer(data, dtype=_torch_dtype(dtype)).reshape(dims)  # owns ``data``: no copy


# --- the weight map (recorded at export) -------------------------------------------------------------------------


def _normalize(name: str) -> str:
    # PEFT wraps adapted layers: `to_q.base_layer.weight` is the weight of `to_q`.
    return name.replace(".base_layer.", ".")


def _scope(param: str) -> str:
    """``transformer_blocks.0.attn.to_q.weight`` -> ``/transformer_blocks.0/attn/to_q/`` (a node-name scope)."""
    return "/" + "/".join(param.split(".")[:-1]) + "/"


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            out[name].append((node, i))
    return out


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _quant_info(node: Any, graph: OnnxWeights, data_dims: tuple[int, ...]) -> dict[str, Any]:
    """Scale/zero-point/axis of a Q or DQ node's weight quantization (raises UnsupportedError for block quant)."""
    if _attr(node, "block_size", 0):
        raise UnsupportedError("block-quantized (nvfp4-style) weights")
    scale = node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if scale not in graph.inits:
        raise UnsupportedError(f"scale '{scale}' is computed in the graph, not a constant")
    per_channel = len(graph.dims(scale)) == 1 and graph.dims(scale)[0] > 1
    axis = _attr(node, "axis", 1) if per_channel else None
    if axis is not None and axis < 0:
        axis += len(data_dims)
    return {"scale": scale, "zero_point": zp, "axis": axis}


def _layout_from_consumer(value: str, consumers: dict[str, list[tuple[Any, int]]]) -> str | None:
    """How a weight feeding ``value`` is stored, from its consumer: MatMul's B is W^T, Gemm's B is W with
    transB=1; each 2-D Transpose in between flips it."""
    flips = 0
    for _ in range(8):
        uses = consumers.get(value, [])
        if len(uses) != 1:
            return None
        node, idx = uses[0]
        if node.op_type == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            flips += 1
            value = node.output[0]
            continue
        if node.op_type in ("Cast", "Identity") or node.op_type in _Q_OPS or node.op_type in _DQ_OPS:
            value = node.output[0]
            continue
        if node.op_type == "MatMul" and idx == 1:
            base = "transposed"
        elif node.op_type == "Gemm" and idx == 1:
            base = "same" if _attr(node, "transB", 0) else "transposed"
        else:
            return None
        if flips % 2:
            base = "same" if base == "transposed" else "transposed"
        return base
    return None


def build_weight_map(module: torch.nn.Module, onnx_path: Path) -> dict[str, Any]:
    """Map every parameter of ``module`` (the exported component) to the ONNX initializer it became.

    Returns ``{"version", "params": {name: entry}}``; an entry has ``shape``/``dtype`` (torch) and either
    ``initializer``, ``layout``, ``onnx_dtype`` (and ``quant`` for Q/DQ weights) or ``status`` (unmapped,
    ambiguous, shared) with a ``reason``.
    """

    graph = OnnxWeights(onnx_path)
    consumers = _consumers(graph.model)
    params: dict[str, torch.Tensor] = {}
    for n, p in module.named_parameters():
        params.setdefault(_normalize(n), p.detach())

    # Content match for float weights: candidates by dtype and dims, then a fingerprint of 4096 sampled values,
    # then exact equality. Each initializer is read once; no full-size hashing or transposed copies.
    wanted: dict[tuple[str, tuple[int, ...]], list[tuple[str, str]]] = defaultdict(list)
    prints: dict[tuple[str, str], bytes] = {}
    for pname, p in params.items():
        dtype = str(p.dtype).removeprefix("torch.")
        wanted[(dtype, tuple(p.shape))].append((pname, "same"))
        if p.ndim == 2:
            wanted[(dtype, tuple(p.shape[::-1]))].append((pname, "transposed"))
    matches: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in graph.inits:
        dtype = graph.dtype(name)
        cands = wanted.get((dtype, graph.dims(name)), []) if dtype is not None and dtype not in QMAX else []
        if not cands:
            continue
        value = graph.tensor(name)
        fp = _fingerprint(value)
        for pname, layout in cands:
            view = params[pname] if layout == "same" else params[pname].t()
            if (pname, layout) not in prints:
                prints[(pname, layout)] = _fingerprint(view)
            if prints[(pname, layout)] == fp and _same_bytes(value, view) and (name, layout) not in matches[pname]:
                matches[pname].append((name, layout))

    claims: dict[str, list[str]] = defaultdict(list)
    for pname, found in matches.items():
        for init, _ in found:
            claims[init].append(pname)

    entries: dict[str, dict[str, Any]] = {}
    for pname, p in params.items():
        entry: dict[str, Any] = {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
        found = matches.get(pname, [])
        own = [(i, lay) for i, lay in found if len(claims[i]) == 1]
        if not own and found:
            # Equal tensors (e.g. norms initialised to ones): the initializer named after the parameter, else the
            # one whose consumers sit in the parameter's module scope.
            own = [(i, lay) for i, lay in found if i == pname or i.endswith("." + pname)]
            if not own:
                scope = _scope(pname)
                own = [(i, lay) for i, lay in found if any(scope in n.name for n, _ in consumers.get(i, []))]
        own_inits: dict[str, str] = {}
        for i, lay in own:
            own_inits.setdefault(i, lay)
        if own_inits:
            (init, layout), *rest = own_inits.items()
            entry.update(initializer=init, layout=layout, onnx_dtype=graph.dtype(init))
            if rest:  # the exporter kept more than one copy (e.g. W and a folded W^T): a refit writes them all
                entry["copies"] = [{"initializer": i, "layout": lay} for i, lay in rest]
        elif found:
            entry.update(status="ambiguous", reason=f"other parameters have identical values ({len(found)} matches)")
        else:
            entry.update(status="unmapped", reason="no initializer holds its values (folded or quantized)")
        entries[pname] = entry

    _map_quantized(graph, consumers, params, entries)
    _attach_qdq(graph, consumers, entries)

    # Two parameters on one initializer (equal tensors the exporter deduplicated): a refit of one changes both.
    users: dict[str, list[str]] = defaultdict(list)
    for pname, e in entries.items():
        for init, _ in targets(e):
            users[init].append(pname)
    for init, names in users.items():
        if len(names) > 1:
            for pname in names:
                others = [n for n in names if n != pname]
                entries[pname] = {
                    "shape": entries[pname]["shape"],
                    "dtype": entries[pname]["dtype"],
                    "status": "shared",
                    "reason": f"initializer '{init}' also holds {others[0]} (equal values, deduplicated at export)",
                }
    return {"version": WEIGHT_MAP_VERSION, "params": dict(sorted(entries.items()))}


def _map_quantized(
    graph: OnnxWeights,
    consumers: dict[str, list[tuple[Any, int]]],
    params: dict[str, torch.Tensor],
    entries: dict[str, dict[str, Any]],
) -> None:
    """int8/fp8 initializers read through DequantizeLinear: matched to a parameter by node scope and shape."""
    for node in graph.model.graph.node:
        if node.op_type not in _DQ_OPS or node.input[0] not in graph.inits:
            continue
        init = node.input[0]
        qdtype = graph.dtype(init)
        if qdtype not in QMAX:
            continue
        dims = graph.dims(init)
        names = [node.name] + [n.name for n, _ in consumers.get(node.output[0], [])]
        pname = None
        for name in names:
            segs = [s for s in name.split("/") if s][:-1]
            for start in (0, 1):
                for end in range(len(segs), start, -1):
                    cand = ".".join(segs[start:end]) + ".weight"
                    if cand in params and params[cand].numel() == _numel(dims):
                        pname = cand
                        break
                if pname:
                    break
            if pname:
                break
        if pname is None or "initializer" in entries.get(pname, {}):
            continue
        p = params[pname]
        shape = tuple(p.shape)
        if dims == shape and dims != shape[::-1]:
            layout: str | None = "same"
        elif dims == shape[::-1] and dims != shape:
            layout = "transposed"
        else:
            layout = _layout_from_consumer(node.output[0], consumers)
        if layout is None:
            entries[pname].update(status="unmapped", reason=f"cannot tell the layout of quantized '{init}'")
            continue
        try:
            quant = _quant_info(node, graph, dims)
        except UnsupportedError as exc:
            entries[pname].update(status="unmapped", reason=f"quantized as {exc}")
            continue
        entries[pname] = {
            "shape": list(shape),
            "dtype": str(p.dtype).removeprefix("torch."),
            "initializer": init,
            "layout": layout,
            "onnx_dtype": qdtype,
            "quant": {"kind": "dq", "qdtype": qdtype, **quant},
        }


def _attach_qdq(
    graph: OnnxWeights, consumers: dict[str, list[tuple[Any, int]]], entries: dict[str, dict[str, Any]]
) -> None:
    """Float weights quantized inside the graph (W -> QuantizeLinear -> DequantizeLinear): note the scale, which a
    refit must recompute from the new weights."""
    for pname, e in entries.items():
        init = e.get("initializer")
        if init is None or "quant" in e:
            continue
        qs = [n for n, i in consumers.get(init, []) if n.op_type in _Q_OPS and i == 0]
        if not qs:
            continue
        q = qs[0]
        zp = q.input[2] if len(q.input) > 2 and q.input[2] else None
        qdtype = _ONNX_TORCH.get(graph.inits[zp].data_type) if zp and zp in graph.inits else None
        qdtype = qdtype or _ONNX_TORCH.get(_attr(q, "output_dtype", 0)) or "uint8"  # ONNX's default is uint8
        dq_scales = {n.input[1] for n, i in consumers.get(q.output[0], []) if n.op_type in _DQ_OPS and i == 0}
        reason = None
        if qdtype not in QMAX:
            reason = f"quantized to {qdtype} (asymmetric); refit re-quantizes int8 and fp8 e4m3 only"
        elif dq_scales - {q.input[1]}:
            reason = "its QuantizeLinear and DequantizeLinear use different scale initializers"
        else:
            try:
                e["quant"] = {"kind": "qdq", "qdtype": qdtype, **_quant_info(q, graph, graph.dims(init))}
            except UnsupportedError as exc:
                reason = f"quantized as {exc}"
        if reason:
            entries[pname] = {"shape": e["shape"], "dtype": e["dtype"], "status": "unmapped", "reason": reason}


def targets(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(initializer, layout) of every copy of a mapped parameter, the primary first."""
    if "initializer" not in entry:
        return []
    return [(entry["initializer"], entry["layout"])] + [
        (c["initializer"], c["layout"]) for c in entry.get("copies", [])
    ]


def _relayout(value: Any, src: str, dst: str) -> Any:
    return value.t().contiguous() if src != dst else value


def _fingerprint(t: torch.Tensor, n: int = 4096) -> bytes:
    """sha256 of up to ``n`` evenly spaced values of ``t`` (any strides: no copy of a transposed view) and its shape."""
    import torch

    total = t.numel()
    if total == 0:
        return hashlib.sha256(repr(tuple(t.shape)).encode()).digest()
    m = min(total, n)
    k = torch.arange(m, dtype=torch.int64) * (total - 1) // max(m - 1, 1)  # integer spacing: exact at any size
    vals = t[k // t.shape[1], k % t.shape[1]] if t.ndim == 2 else t.reshape(-1)[k]
    return hashlib.sha256(tensor_bytes(vals) + repr(tuple(t.shape)).encode()).digest()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-for-byte equality (a memcmp; elementwise fp16 comparison of a transposed view is ~50x slower)."""
    import numpy as np
    import torch

    return a.shape == b.shape and np.array_equal(
        a.contiguous().reshape(-1).view(torch.uint8).numpy(), b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def write_weight_map(module: torch.nn.Module, onnx_path: Path, artifact_dir: Path, component: str) -> dict[str, Any]:
    """Build the weight map of an export and write it as JSON; returns its manifest entry (file, sha256, size
    and counts)."""
    from dtcompile.manifest import file_entry

    t0 = time.perf_counter()
    wmap = build_weight_map(module, onnx_path)
    wmap["onnx"] = Path(onnx_path).relative_to(artifact_dir).as_posix()
    path = artifact_dir / weight_map_file(component)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wmap, indent=1, sort_keys=True) + "\n")
    counts: dict[str, int] = defaultdict(int)
    for e in wmap["params"].values():
        counts["mapped" if "initializer" in e else e["status"]] += 1
    log.info(
        "weight map: %d parameters, %s in %.1f s",
        len(wmap["params"]),
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        time.perf_counter() - t0,
    )
    return {**file_entry(artifact_dir, path), **dict(sorted(counts.items()))}


def load_weight_map(artifact_dir: Path, component_entry: dict[str, Any], component: str) -> dict[str, Any]:
    """Read and verify (sha256) an artifact's weight map."""
    from dtcompile.manifest import verify_file

    entry = component_entry.get("weight_map")
    if not entry:
        raise ArtifactError(
            f"{artifact_dir}: the artifact has no weight map for {component} (built by an older dtc, or stopped "
            "before export); rebuild it with dtc build to make it refittable"
        )
    path = verify_file(artifact_dir, entry)
    data = json.loads(path.read_text())
    if data.get("version") != WEIGHT_MAP_VERSION:
        raise ArtifactError(f"{path}: weight map version {data.get('version')!r}, this dtc reads {WEIGHT_MAP_VERSION}")
    return data


# --- quantization ---------------------------------------------------------------------------------------------


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
    if "initializer" not in e:
        raise UnsupportedError(
            f"{label}: cannot refit '{param}': {e.get('status')} in the exported graph ({e.get('reason')}); "
            "fuse this LoRA with dtc build instead (lora: in the recipe)"
        )
    return e


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
    from dtcompile.stages.lora import apply_deltas

    active = [(w, s) for w, s in loras if s != 0.0]
    now = sorted({p for w, _ in active for p in w.params()})
    touched = sorted(set(ever_touched) | {p for w, _ in loras for p in w.params()})
    store = dict(base_store)
    entries = {p: _entry(wmap, p, "refit") for p in touched}

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
                updates[copy] = _relayout(stored, layout, copy_layout)
            continue
        if q and str(stored.dtype).removeprefix("torch.") == q["qdtype"]:
            w = dequantize(stored, store[q["scale"]], q["axis"])
        else:
            w = stored.float() if q else stored
        torch_base[p] = w.t() if layout == "transposed" else w
    new = apply_deltas(torch_base, active)
    for p, w in new.items():
        e = entries[p]
        w = w.t().contiguous() if e["layout"] == "transposed" else w.contiguous()
        init = e["initializer"]
        if e.get("quant"):
            updates[init], updates[e["quant"]["scale"]] = _requantize(w, e, graph)
        else:
            updates[init] = w.to(_torch_dtype(e["onnx_dtype"]))
        for copy, copy_layout in targets(e)[1:]:
            updates[copy] = _relayout(updates[init], e["layout"], copy_layout)
    return RefitPlan(updates=updates, base_store=store, touched=touched, computed=now)


def _requantize(w: Any, e: dict[str, Any], graph: OnnxWeights) -> tuple[Any, Any]:
    q = e["quant"]
    scale_dtype = _torch_dtype(graph.dtype(q["scale"]) or "float32")
    q_new, s_new = quantize_weight(w, q["qdtype"], q["axis"], scale_dtype)
    s_new = s_new.reshape(graph.dims(q["scale"]))
    if q["kind"] == "qdq":  # the graph quantizes the float weight itself: keep it float, update the scale
        return w.to(_torch_dtype(e["onnx_dtype"])), s_new
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
    data: dict[str, bytes] = {}
    for name, value in updates.items():
        if name not in graph.inits:
            raise ArtifactError(f"{src}: no initializer '{name}' (the weight map does not match the graph)")
        if tuple(value.shape) != graph.dims(name) or graph.dtype(name) != str(value.dtype).removeprefix("torch."):
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
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
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


def refit_engine(
    engine_path: Path, flavour: str, updates: dict[str, Any], out_path: Path, graph: OnnxWeights
) -> dict[str, Any]:
    """Refit a serialized TensorRT engine with named weights and write it to ``out_path``.

    Pushes ``updates`` (ONNX initializer name -> tensor: the parser names TensorRT weights after them), then any
    weight the refitter still asks for (``get_missing_weights``) from the refit graph ``graph``. Needs a CUDA
    GPU of the engine's arch (deserialization).
    """
    import torch

    from dtcompile.backends.tensorrt import _logger, _write_atomic, gpu_arch, import_trt

    if gpu_arch() is None:
        raise UnsupportedError(f"refitting {engine_path} needs a CUDA GPU (TensorRT deserializes the engine)")
    trt = import_trt(flavour)
    trt_logger = _logger(flavour, trt)
    trt_logger.errors.clear()
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
        raise ArtifactError(f"cannot deserialize {engine_path} for refit: {first}")
    if not engine.refittable:
        raise UnsupportedError(
            f"{engine_path} was built without REFIT; rebuild with engine.refittable: true (needs a GPU at build)"
        )
    refitter = trt.Refitter(engine, trt_logger)
    known = set(refitter.get_all_weights())
    dtypes = {
        torch.float32: trt.float32,
        torch.float16: trt.float16,
        torch.bfloat16: trt.bfloat16,
        torch.int8: trt.int8,
        torch.float8_e4m3fn: trt.fp8,
    }
    keep: list[torch.Tensor] = []

    def push(name: str, value: torch.Tensor) -> None:
        t = value.detach().contiguous().cpu()
        keep.append(t)
        if t.dtype not in dtypes:
            raise UnsupportedError(f"refit: TensorRT weight '{name}' has dtype {t.dtype}")
        if not refitter.set_named_weights(name, trt.Weights(dtypes[t.dtype], t.data_ptr(), t.numel())):
            first = trt_logger.errors[-1] if trt_logger.errors else "size or dtype differs from the engine's"
            raise BuildError(f"refit: TensorRT rejected new weights for '{name}' in {engine_path}: {first}")

    folded = sorted(n for n in updates if n not in known)
    if folded:
        raise UnsupportedError(
            f"{engine_path}: TensorRT folded weight '{folded[0]}' into another layer, so it cannot be refit "
            f"({len(folded)} such); fuse the LoRA with dtc build instead"
        )
    for name, value in updates.items():
        push(name, value)
    for name in refitter.get_missing_weights():
        if name not in graph.inits:
            raise BuildError(f"refit: TensorRT needs weight '{name}', which the ONNX graph does not hold")
        push(name, graph.tensor(name))
    if not refitter.refit_cuda_engine():
        first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
        raise BuildError(f"refit of {engine_path} failed: {first}")
    serialized = engine.serialize()
    sha = _write_atomic(out_path, memoryview(serialized))
    return {"sha256": sha, "size": out_path.stat().st_size}


# --- engines: what can be refit here --------------------------------------------------------------------------------


def engine_blocker(entry: dict[str, Any], gpu: str | None) -> str | None:
    """Why a manifest engine entry cannot be refit on this machine (None: it can)."""
    backend, arch = entry["backend"], entry["arch"]
    if backend == "onnxruntime":
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


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # every later writer replaces files by rename, so sharing the inode is safe
    except OSError:
        shutil.copy2(src, dst)


def load_base_store(artifact_dir: Path, lora: dict[str, Any]) -> dict[str, Any]:
    """The stored base values (initializer name -> tensor), verified against the manifest's sha256."""
    from safetensors.torch import load_file

    from dtcompile.manifest import verify_file

    entry = lora.get("base_store")
    if not entry:
        return {}
    return dict(load_file(str(verify_file(artifact_dir, entry))))


def save_base_store(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata={"format": "pt"})


def _new_key(base_key: str, built_with: list[dict[str, Any]], adapters: list[dict[str, Any]]) -> str:
    if not adapters and not built_with:
        return base_key  # all weights are the base bytes again: the artifact is the one that was built
    payload = {"refit_of": base_key, "lora": [[a["sha256"], a["scale"]] for a in adapters]}
    return sha256_json(payload)


def refit_artifact(
    artifact_dir: Path,
    loras: list[tuple[str, float]],
    *,
    out_dir: Path | None = None,
    in_place: bool = False,
    drop_unrefittable: bool = False,
) -> RefitReport:
    """Swap ``loras`` ((path, scale) pairs; empty = base weights) into the artifact at ``artifact_dir``.

    Everything is checked (engines refittable here, adapter files, keys, ranks, shapes) before anything is
    written; the result is assembled in a temp folder next to the destination and renamed into place.

    Raises:
        ArtifactError, UnsupportedError, RecipeError: one line naming what is wrong and the fix.
    """
    from dtcompile.backends.tensorrt import gpu_arch
    from dtcompile.core.files import replace_dir
    from dtcompile.manifest import file_entry, read_manifest, write_manifest
    from dtcompile.stages.lora import check_lora_fits, read_lora, resolve_lora

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    artifact_dir = Path(artifact_dir)
    if in_place and out_dir is not None and Path(out_dir).resolve() != artifact_dir.resolve():
        raise DtcError("give either --out DIR or --in-place, not both")
    if not in_place and out_dir is None:
        raise DtcError("refit needs --out DIR (a new artifact) or --in-place (replace this one atomically)")
    dest = artifact_dir if in_place else Path(out_dir)  # type: ignore[arg-type]
    if dest.resolve() == artifact_dir.resolve():
        in_place = True
    elif dest.exists() and any(dest.iterdir()) and not (dest / "manifest.json").is_file():
        raise DtcError(f"--out {dest}: folder exists and is not a dtc artifact; choose an empty or new folder")

    manifest = read_manifest(artifact_dir)
    if manifest.get("stopped_after"):
        raise ArtifactError(
            f"{artifact_dir}: artifact stopped after stage '{manifest['stopped_after']}'; build it fully first"
        )
    if len(manifest["components"]) != 1:
        raise UnsupportedError(
            f"{artifact_dir}: refit takes artifacts with one engine graph; this one has "
            f"{len(manifest['components'])} ({', '.join(manifest['components'])}, e.g. a block-cached build): "
            "put the LoRA in the recipe's lora: section and rebuild"
        )
    comp = next(iter(manifest["components"]))
    centry = manifest["components"][comp]
    wmap = load_weight_map(artifact_dir, centry, comp)
    old_lora = manifest.get("lora") or {}

    # Engines: decide before reading any weights.
    gpu = gpu_arch()
    blocked = [(e, engine_blocker(e, gpu)) for e in centry["engines"]]
    blocked = [(e, r) for e, r in blocked if r]
    if blocked and not drop_unrefittable:
        e, reason = blocked[0]
        more = f" (+{len(blocked) - 1} more)" if len(blocked) > 1 else ""
        raise UnsupportedError(f"{reason}{more}; or pass --drop-unrefittable to leave such engines out")

    # Adapters: resolve, parse and check against the weight map before writing.
    t0 = time.perf_counter()
    resolved: list[ResolvedLora] = [resolve_lora(src, None, scale, "--lora") for src, scale in loras]
    shapes = {p: tuple(e["shape"]) for p, e in wmap["params"].items()}
    parsed = [read_lora(r, manifest["source"]["pipeline_class"], comp) for r in resolved]
    for w in parsed:
        check_lora_fits(w, shapes, f"the artifact's {comp}")
        for p in w.params():
            _entry(wmap, p, w.label)
    timings["read_loras_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    onnx_rel = centry["onnx"]["file"]
    graph = OnnxWeights(artifact_dir / onnx_rel)
    base_store = load_base_store(artifact_dir, old_lora)
    plan = plan_refit(
        wmap,
        graph,
        base_store,
        list(old_lora.get("touched", [])),
        [(w, r.scale) for w, r in zip(parsed, resolved, strict=True)],
    )
    timings["compute_s"] = time.perf_counter() - t0

    adapters = [{**r.record(), **w.summary()} for r, w in zip(resolved, parsed, strict=True)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.refit-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp is owner-only; artifacts are shared read-only
    try:
        t0 = time.perf_counter()
        new_onnx = tmp / onnx_rel
        onnx_dir = Path(onnx_rel).parent
        rewritten = {Path(onnx_rel).as_posix()} | {x["file"] for x in centry["onnx"].get("external_data", [])}
        rewritten.add((onnx_dir / overlay_file(new_onnx.name)).as_posix())
        dropped_files = {e["file"] for e, _ in blocked}
        trt_entries = [e for e in centry["engines"] if e["backend"] != "onnxruntime" and e["file"] not in dropped_files]
        skip = rewritten | dropped_files | {e["file"] for e in trt_entries} | {"manifest.json"}
        skip.add(base_store_file(comp))
        for src in sorted(p for p in artifact_dir.rglob("*") if p.is_file()):
            rel = src.relative_to(artifact_dir).as_posix()
            if rel not in skip:
                _link_or_copy(src, tmp / rel)
        graph_files = rewrite_onnx(artifact_dir / onnx_rel, new_onnx, plan.updates)
        new_onnx_entry = file_entry(tmp, new_onnx)
        timings["write_onnx_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        refit_done: list[str] = []
        new_graph = OnnxWeights(new_onnx) if trt_entries else graph
        new_engines: list[dict[str, Any]] = []
        for e in centry["engines"]:
            if e["file"] in dropped_files:
                continue
            if e["backend"] == "onnxruntime":
                new_engines.append({**e, **{k: v for k, v in new_onnx_entry.items() if k != "file"}})
                continue
            info = refit_engine(artifact_dir / e["file"], e["backend"], plan.updates, tmp / e["file"], new_graph)
            new_engines.append({**e, **info})
            refit_done.append(f"{e['backend']}:{e['arch']}")
        timings["refit_engines_s"] = time.perf_counter() - t0

        store_rel = base_store_file(comp)
        if base_store and set(plan.base_store) == set(
            base_store
        ):  # nothing newly touched: the stored base is unchanged
            _link_or_copy(artifact_dir / store_rel, tmp / store_rel)
        else:
            save_base_store(plan.base_store, tmp / store_rel)
        onnx_entry = {**centry["onnx"], **new_onnx_entry}
        old_entries = {x["file"]: x for x in centry["onnx"].get("external_data", [])}
        onnx_entry["external_data"] = []
        for name, how in sorted(graph_files.items()):
            rel = (onnx_dir / name).as_posix()
            if rel == Path(onnx_rel).as_posix():
                continue
            linked = how == "linked" and rel in old_entries  # unchanged bytes: no need to hash them again
            onnx_entry["external_data"].append(old_entries[rel] if linked else file_entry(tmp, tmp / rel))
        new_manifest = json.loads(json.dumps(manifest))
        nc = new_manifest["components"][comp]
        nc["onnx"] = onnx_entry
        nc["engines"] = new_engines
        dropped = [{"backend": e["backend"], "arch": e["arch"], "reason": r} for e, r in blocked]
        new_manifest["skipped"] = [*manifest.get("skipped", []), *dropped]
        built_with = old_lora.get("built_with", [])
        base_key = old_lora.get("base_key", manifest["key"])
        new_manifest["key"] = _new_key(base_key, built_with, adapters)
        seconds = time.perf_counter() - t_start
        new_manifest["lora"] = {
            "adapters": adapters,
            "built_with": built_with,
            "base_key": base_key,
            "touched": plan.touched,
            "base_store": file_entry(tmp, tmp / base_store_file(comp)),
            "refit": {
                "updated_initializers": len(plan.updates),
                "recomputed_parameters": len(plan.computed),
                "engines": ["onnxruntime:any", *refit_done],
                "dropped": dropped,
                "wall_s": round(seconds, 3),
            },
        }
        write_manifest(tmp, new_manifest)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total_s"] = time.perf_counter() - t_start
    log.info(
        "refit %s -> %s: %d adapter(s), %d initializers in %.2f s",
        artifact_dir,
        dest,
        len(adapters),
        len(plan.updates),
        timings["total_s"],
    )
    return RefitReport(
        artifact_dir=dest,
        manifest=new_manifest,
        adapters=adapters,
        updated=len(plan.updates),
        touched=len(plan.touched),
        refit_engines=refit_done,
        dropped=dropped,
        seconds=timings["total_s"],
        timings=timings,
    )


# --- build-time recording (recipe LoRAs) ------------------------------------------------------------------------------


def record_build_loras(
    artifact_dir: Path, component: str, component_entry: dict[str, Any], fused: FusedLoras
) -> dict[str, Any]:
    """After an export with recipe LoRAs fused: store the base (pre-fuse) value of every touched weight in the
    engine's layout and dtype, so a later refit starts from the base. Returns the manifest's ``lora`` section."""
    from dtcompile.manifest import file_entry

    if "weight_map" not in component_entry:  # e.g. a block-cached (split) export: not refittable
        return {"adapters": fused.adapters, "built_with": fused.adapters, "touched": []}
    wmap = json.loads((artifact_dir / component_entry["weight_map"]["file"]).read_text())
    store: dict[str, Any] = {}
    touched = []
    for param, value in fused.base.items():
        e = wmap["params"].get(param, {})
        if "initializer" not in e:
            log.warning("LoRA-touched %s is %s in the graph: it cannot be refit later", param, e.get("status"))
            continue
        touched.append(param)
        v = _relayout(value.contiguous(), "same", e["layout"])
        # quantized weights keep a float base: a refit quantizes it with a recomputed scale
        store[e["initializer"]] = v if e.get("quant") else v.to(_torch_dtype(e["onnx_dtype"]))
    path = artifact_dir / base_store_file(component)
    save_base_store(store, path)
    return {
        "adapters": fused.adapters,
        "built_with": fused.adapters,
        "touched": sorted(touched),
        "base_store": file_entry(artifact_dir, path),
    }


# --- weight-only Q/DQ artifacts (a stand-in for calibrated ones in tests and benchmarks) -------------------------------


def weight_only_qdq_artifact(
    src: Path, dst: Path, fmt: str = "fp8", exclude: tuple[str, ...] = ("x_embedder.*", "context_embedder.*")
) -> Path:
    """Copy an onnxruntime artifact with its 2-D weights stored quantized and read through DequantizeLinear, as
    ModelOpt's fp8/int8 exports store them (fp8: per-tensor scale amax/448; int8: per output channel amax/127).

    Activations stay float: this isolates the weight requantization a refit does from calibration. The weight
    map entries become ``quant: {kind: dq}`` ones, the key and manifest change accordingly. Used to test and
    measure refits of quantized artifacts where no calibrated artifact is at hand.
    """
    import fnmatch

    import onnx

    from dtcompile.manifest import file_entry, read_manifest, write_manifest

    qdtype = {"fp8": "float8_e4m3fn", "int8": "int8"}[fmt]
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    comp = next(iter(manifest["components"]))
    centry = manifest["components"][comp]
    if any(e["backend"] != "onnxruntime" for e in centry["engines"]):
        raise UnsupportedError("weight_only_qdq_artifact takes onnxruntime-only artifacts")
    wmap = load_weight_map(src, centry, comp)
    graph = OnnxWeights(src / centry["onnx"]["file"])
    full = onnx.load(str(graph.path))  # with external data
    inits = {t.name: t for t in full.graph.initializer}
    new_nodes = []
    converted = []
    for pname, e in wmap["params"].items():
        if "initializer" not in e or len(e["shape"]) != 2 or e.get("copies") or e.get("quant"):
            continue
        if any(fnmatch.fnmatchcase(pname, pat) for pat in exclude):
            continue
        init = e["initializer"]
        w = graph.tensor(init)
        axis = None if fmt == "fp8" else (0 if e["layout"] == "same" else 1)
        q, scale = quantize_weight(w, qdtype, axis, w.dtype)  # the DQ output keeps the graph's float type
        qname, sname = f"{init}__{fmt}", f"{init}__scale"
        qt = onnx.TensorProto()
        qt.name, qt.data_type = qname, {"float8_e4m3fn": 17, "int8": 3}[qdtype]
        qt.dims.extend(q.shape)
        qt.raw_data = tensor_bytes(q)
        st = onnx.TensorProto()
        st.name, st.data_type = sname, graph.inits[init].data_type
        st.dims.extend(scale.shape)
        st.raw_data = tensor_bytes(scale)
        full.graph.initializer.remove(inits[init])
        full.graph.initializer.extend([qt, st])
        scope = "/" + "/".join(["wq", *pname.split(".")[:-1], "weight_quantizer"]) + "/DequantizeLinear"
        kwargs = {"axis": axis} if axis is not None else {}
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [qname, sname], [init], name=scope, **kwargs))
        e.update(initializer=qname, onnx_dtype=qdtype)
        e["quant"] = {"kind": "dq", "qdtype": qdtype, "scale": sname, "zero_point": None, "axis": axis}
        converted.append(pname)
    nodes = list(full.graph.node)
    del full.graph.node[:]
    full.graph.node.extend(new_nodes + nodes)  # DQ of constants first keeps the graph sorted

    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(x for x in src.rglob("*") if x.is_file()):
        rel = p.relative_to(src).as_posix()
        if not rel.startswith(("onnx/", "refit/")) and rel != "manifest.json":
            _link_or_copy(p, dst / rel)
    onnx_path = dst / centry["onnx"]["file"]
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in full.graph.initializer) > 1536 * 2**20
    data_name = onnx_path.name + ".data"
    onnx.save_model(full, str(onnx_path), save_as_external_data=big, location=data_name, size_threshold=1024)
    wpath = dst / centry["weight_map"]["file"]
    wpath.write_text(json.dumps(wmap, indent=1, sort_keys=True) + "\n")
    onnx_entry = {**centry["onnx"], **file_entry(dst, onnx_path)}
    onnx_entry["external_data"] = [file_entry(dst, dst / "onnx" / data_name)] if big else []
    centry.update(onnx=onnx_entry, weight_map={**centry["weight_map"], **file_entry(dst, wpath)})
    centry["engines"] = [{**centry["engines"][0], **file_entry(dst, onnx_path)}]
    manifest.pop("lora", None)
    manifest["precision"] = f"{fmt} weights (weight-only Q/DQ, {len(converted)} tensors)"
    manifest["key"] = hashlib.sha256(f"{manifest['key']}:weight-only-{fmt}".encode()).hexdigest()
    write_manifest(dst, manifest)
    return dst
