"""The weight map: which ONNX initializer every torch parameter of an exported component became.

Recorded once at export into ``onnx/<component>.weights.json`` (``write_weight_map``): for every torch
parameter, the ONNX initializer it became, its layout (``same`` or ``transposed``: the legacy exporter folds
Linear weights into pre-transposed ``onnx::MatMul_N`` constants) and dtype, and for quantized weights the Q/DQ
scale initializer and axis. Float weights are matched by content (a fingerprint of sampled values, then exact
bytes, in both layouts), which survives renaming and constant folding; ties between equal tensors are broken by
name and by the consuming node's module scope. Quantized weights (int8/fp8 initializers read through a
DequantizeLinear) are matched by scope and shape. A refit never needs the torch model or a re-export.

Also here, because the build records them next to the weight map: the base store
(``refit/<component>.base.safetensors``: the base, LoRA-free value of every initializer an adapter has touched)
and ``record_build_loras``, which writes it after an export with recipe LoRAs fused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import ONNX_WEIGHT_TYPES, dtype_name, torch_dtype
from dtcompile.core.errors import ArtifactError, UnsupportedError
from dtcompile.core.numerics import QMAX
from dtcompile.weights.onnx_weights import OnnxWeights, tensor_bytes

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger("dtcompile.refit")

WEIGHT_MAP_VERSION = 1
_DQ_OPS = ("DequantizeLinear",)
_Q_OPS = ("QuantizeLinear",)

#: A parameter's candidate initializers: (initializer, layout) pairs.
Matches = dict[str, list[tuple[str, str]]]
Consumers = dict[str, list[tuple[Any, int]]]


def weight_map_file(component: str) -> str:
    return f"onnx/{component}.weights.json"


def base_store_file(component: str) -> str:
    return f"refit/{component}.base.safetensors"


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


def build_weight_map(module: torch.nn.Module, onnx_path: Path, unread: Sequence[str] = ()) -> dict[str, Any]:
    """Map every parameter of ``module`` (the exported component) to the ONNX initializer it became.

    Returns ``{"version", "params": {name: entry}}``; an entry has ``shape``/``dtype`` (torch) and either
    ``initializer``, ``layout``, ``onnx_dtype`` (and ``quant`` for Q/DQ weights) or ``status`` (unmapped,
    ambiguous, shared, unread) with a ``reason``. ``unread``: fnmatch patterns of parameters the family says
    the graph never reads (``ModelAdapter.unread_params``); an unmapped one of them is ``unread``.
    """

    graph = OnnxWeights(onnx_path)
    consumers = _consumers(graph.model)
    params: dict[str, torch.Tensor] = {}
    for n, p in module.named_parameters():
        params.setdefault(_normalize(n), p.detach())

    matches = _content_matches(graph, params)
    claims: dict[str, list[str]] = defaultdict(list)
    for pname, found in matches.items():
        for init, _ in found:
            claims[init].append(pname)
    entries = {
        pname: _float_entry(pname, p, matches.get(pname, []), claims, consumers, graph) for pname, p in params.items()
    }
    _map_quantized(graph, consumers, params, entries)
    _attach_qdq(graph, consumers, entries)
    _mark_shared(entries)
    for pname, e in entries.items():
        if e.get("status") == "unmapped" and any(fnmatchcase(pname, pat) for pat in unread):
            e.update(status="unread", reason="the graph never reads it (its output does not reach the graph's)")
    return {"version": WEIGHT_MAP_VERSION, "params": dict(sorted(entries.items()))}


def _content_matches(graph: OnnxWeights, params: dict[str, torch.Tensor]) -> Matches:
    """Content match for float weights: candidates by dtype and dims, then a fingerprint of 4096 sampled values,
    then exact equality. Each initializer is read once; no full-size hashing or transposed copies."""
    wanted: dict[tuple[str, tuple[int, ...]], list[tuple[str, str]]] = defaultdict(list)
    prints: dict[tuple[str, str], bytes] = {}
    for pname, p in params.items():
        dtype = dtype_name(p.dtype)
        wanted[(dtype, tuple(p.shape))].append((pname, "same"))
        if p.ndim == 2:
            wanted[(dtype, tuple(p.shape[::-1]))].append((pname, "transposed"))
    matches: Matches = defaultdict(list)
    for name in graph.inits:
        init_dtype = graph.dtype(name)
        cands = (
            wanted.get((init_dtype, graph.dims(name)), []) if init_dtype is not None and init_dtype not in QMAX else []
        )
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
    return matches


def _float_entry(
    pname: str,
    p: torch.Tensor,
    found: list[tuple[str, str]],
    claims: dict[str, list[str]],
    consumers: Consumers,
    graph: OnnxWeights,
) -> dict[str, Any]:
    """The weight map entry of one parameter from its content matches ``found`` (``claims``: initializer ->
    the parameters whose content it matches)."""
    entry: dict[str, Any] = {"shape": list(p.shape), "dtype": dtype_name(p.dtype)}
    own = [(i, lay) for i, lay in found if len(claims[i]) == 1]
    if not own and found:
        own = _break_tie(pname, found, consumers)
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
    return entry


def _break_tie(pname: str, found: list[tuple[str, str]], consumers: Consumers) -> list[tuple[str, str]]:
    """Equal tensors (e.g. norms initialised to ones): the initializer named after the parameter, else the one
    whose consumers sit in the parameter's module scope."""
    own = [(i, lay) for i, lay in found if i == pname or i.endswith("." + pname)]
    if not own:
        scope = _scope(pname)
        own = [(i, lay) for i, lay in found if any(scope in n.name for n, _ in consumers.get(i, []))]
    return own


def _mark_shared(entries: dict[str, dict[str, Any]]) -> None:
    """Two parameters on one initializer (equal tensors the exporter deduplicated): a refit of one changes both,
    so both become ``shared``."""
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
            "dtype": dtype_name(p.dtype),
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
        qdtype = ONNX_WEIGHT_TYPES.get(graph.inits[zp].data_type) if zp and zp in graph.inits else None
        qdtype = qdtype or ONNX_WEIGHT_TYPES.get(_attr(q, "output_dtype", 0)) or "uint8"  # ONNX's default is uint8
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


def relayout(value: Any, src: str, dst: str) -> Any:
    """``value`` (a 2-D weight in layout ``src``) in layout ``dst`` (``same`` or ``transposed``)."""
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


def write_weight_map(
    module: torch.nn.Module, onnx_path: Path, artifact_dir: Path, component: str, unread: Sequence[str] = ()
) -> dict[str, Any]:
    """Build the weight map of an export and write it as JSON; returns its manifest entry (file, sha256, size
    and counts)."""
    from dtcompile.manifest import file_entry

    t0 = time.perf_counter()
    wmap = build_weight_map(module, onnx_path, unread)
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


# --- the base store and build-time recording (recipe LoRAs) -------------------------------------------------------


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


def record_build_loras(
    artifact_dir: Path, component: str, component_entry: dict[str, Any], base: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """After an export with recipe LoRAs fused into ``component``: store the base (pre-fuse) value ``base`` of
    every touched weight in the engine's layout and dtype, so a later refit starts from the base. Returns the
    component's LoRA state for the manifest (``touched`` and ``base_store``)."""
    from dtcompile.manifest import file_entry

    if "weight_map" not in component_entry:  # e.g. a block-cached (split) export: not refittable
        return {"touched": []}
    wmap = json.loads((artifact_dir / component_entry["weight_map"]["file"]).read_text())
    store: dict[str, Any] = {}
    touched = []
    for param, value in base.items():
        e = wmap["params"].get(param, {})
        if "initializer" not in e:
            log.warning("LoRA-touched %s is %s in the graph: it cannot be refit later", param, e.get("status"))
            continue
        touched.append(param)
        v = relayout(value.contiguous(), "same", e["layout"])
        # quantized weights keep a float base: a refit quantizes it with a recomputed scale
        store[e["initializer"]] = v if e.get("quant") else v.to(torch_dtype(e["onnx_dtype"]))
    path = artifact_dir / base_store_file(component)
    save_base_store(store, path)
    return {"touched": sorted(touched), "base_store": file_entry(artifact_dir, path)}
