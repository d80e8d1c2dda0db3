"""The ONNX exporter: a torch module and its ExportSpec in, an ONNX graph on disk (OnnxArtifact) out.

Input: the module to export (a wrapper taking the graph inputs positionally and returning one tensor, see
``ModelAdapter.export_module``) and its ``ExportSpec`` (I/O names, dtypes, symbolic dims, example inputs,
opset). Output: ``<out_dir>/<name>.onnx`` (plus ``<name>.onnx.data`` when the weights are stored as ONNX
external data) and an ``OnnxArtifact`` describing it with checksums.

The legacy TorchScript exporter (``dynamo=False``) is used, as NVIDIA's TensorRT demo and ModelOpt do: it is
the one that exports ModelOpt-quantized modules. Its traps are fixed during the export only, by the patches
of ``dtcompile.export.patches``: the ``aten::rms_norm`` symbolic always, the others (diffusers' RoPE) as the
caller selects (``patches``; the model adapter's ``export_patches()`` in the export stage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import stat
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_file
from dtcompile.core.dtypes import dtype_name, from_onnx_name
from dtcompile.core.errors import BuildError
from dtcompile.core.files import copy_byte_range
from dtcompile.core.graph import ExportSpec, TensorSpec
from dtcompile.core.progress import measured
from dtcompile.export.patches import Patch, _gelu_symbolic, _rms_norm_symbolic, resolve_patches

if TYPE_CHECKING:
    import onnx
    import torch

    from dtcompile.core.progress import Progress

logger = log = logging.getLogger("dtcompile.export")

#: Above this many bytes of parameters and buffers the weights go to one external data file (protobuf's hard
#: limit is 2 GiB; the margin covers graph constants the exporter adds).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
#: Initializers smaller than this stay inside the .onnx file when external data is used.
_EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported ONNX graph on disk.

    ``inputs``/``outputs`` are read back from the written graph (names, dtypes, dims with the symbolic names
    of the dynamic axes). ``size`` counts the .onnx file plus its external data file.
    """

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    size: int
    sha256: str
    external_data: Path | None
    external_data_sha256: str | None
    n_nodes: int
    op_types: dict[str, int] = field(hash=False)
    export_s: float

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file that makes up the graph (the .onnx and, if any, its external data)."""
        return (self.path,) if self.external_data is None else (self.path, self.external_data)

    def to_manifest(self, artifact_dir: Path) -> dict[str, Any]:
        """Manifest fields: ``onnx`` = {file, sha256, size, external_data: [{file, sha256, size}]} with paths
        relative to ``artifact_dir``, plus opset, inputs/outputs ({name, dtype, dims}) and node count."""

        def entry(path: Path, sha: str) -> dict[str, Any]:
            try:
                rel = path.relative_to(artifact_dir).as_posix()
            except ValueError:
                raise BuildError(f"{path} is not inside the artifact folder {artifact_dir}") from None
            return {"file": rel, "sha256": sha, "size": path.stat().st_size}

        onnx_entry = entry(self.path, self.sha256)
        onnx_entry["external_data"] = (
            [entry(self.external_data, self.external_data_sha256 or "")] if self.external_data is not None else []
        )
        return {
            "onnx": onnx_entry,
            "opset": self.opset,
            "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in self.outputs],
            "n_nodes": self.n_nodes,
        }


def _storage(kind: str, weight_bytes: int, external_data: bool | None, stream: bool | None) -> tuple[bool, bool]:
    """(external data, stream the weights) for ``export_onnx``'s arguments and the weights' size."""
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    if stream is None:
        stream = external_data is None and use_external
    use_external = use_external or (stream and external_data is None)
    if stream and not use_external:
        raise BuildError("stream_weights writes the weights as external data; it needs external_data=True or None")
    if not use_external and weight_bytes >= 2**31:
        raise BuildError(
            f"{kind} has {weight_bytes / 2**30:.1f} GiB of weights, over protobuf's 2 GiB limit "
            f"for a single .onnx file; use external_data=True (or None)"
        )
    return use_external, stream


def export_onnx(
    module: torch.nn.Module,
    spec: ExportSpec,
    out_dir: Path,
    name: str = "transformer",
    *,
    external_data: bool | None = None,
    optimize: bool = True,
    patches: Sequence[str | Patch] | None = None,
    progress: Progress | None = None,
    stream_weights: bool | None = None,
) -> OnnxArtifact:
    """Export ``module`` to ``<out_dir>/<name>.onnx`` with the dynamic axes and opset of ``spec``.

    Args:
        module: takes the graph inputs positionally (in ``spec.inputs`` order), returns one tensor.
        spec: I/O specs, example inputs (a dict keyed by input name) and opset.
        out_dir: created if missing; only ``<name>.onnx`` and ``<name>.onnx.data`` are written there.
        name: file stem.
        external_data: store weights in one external file ``<name>.onnx.data``; ``None`` decides by size
            (more than 1.5 GiB of parameters and buffers).
        optimize: fold constants, drop dead nodes and sort the graph with onnx-graphsurgeon.
        patches: upstream patches active during the trace (``dtcompile.export.patches``): context-manager
            factories or names in ``PATCHES``; ``None`` applies ``DEFAULT_PATCHES``, ``()`` none. The
            ``aten::rms_norm`` symbolic is always registered.
        progress: the caller's phase progress (``Progress.phase``): tracing, cleaning up, writing, checking.
        stream_weights: keep the weights out of the exporter's in-memory graph (which, under 2 GiB, holds
            and serializes every weight several times over): each one is written to the external data file
            from the module's own tensor, and the graph-surgeon cleanup, which would load them all, is
            skipped (as for graphs over 2 GiB). Needs external data (``external_data`` True or None).
            ``None``: stream exactly when the weights go to external data by size (``external_data`` None and
            more than 1.5 GiB), so no graph between that and 2 GiB is serialized in memory.

    Raises:
        BuildError: the example inputs do not match the spec, the exporter fails, or the written graph's
            inputs/outputs differ from the spec.
    """
    out_dir = Path(out_dir)
    _check_example_inputs(spec)
    args = tuple(spec.example_inputs[n] for n in spec.input_names)
    weight_bytes = _module_bytes(module)
    use_external, stream_weights = _storage(type(module).__name__, weight_bytes, external_data, stream_weights)
    logger.info(
        "export %s: %d inputs, %.1f MiB of weights, opset %d, external data %s%s",
        name,
        len(args),
        weight_bytes / 2**20,
        spec.opset,
        use_external,
        ", weights streamed" if stream_weights else "",
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    data_path = out_dir / f"{name}.onnx.data"
    t0 = time.perf_counter()
    # The exporter writes one file per tensor next to the model when it exceeds 2 GiB: export into a private
    # scratch folder on the same filesystem, then write the final files from it.
    with tempfile.TemporaryDirectory(prefix=f".{name}-export-", dir=out_dir) as scratch:
        raw_path = Path(scratch) / f"{name}.onnx"
        params: dict[str, torch.Tensor] = {}
        _phase(progress, "tracing")
        with measured(f"export {name}: tracing", logger):
            _trace(module, args, spec, raw_path, patches, params if stream_weights else None)
        trace_s = time.perf_counter() - t0
        logger.info("export %s: traced in %.1f s", name, trace_s)

        import onnx

        model = _cleaned_up(
            raw_path, params, name, type(module).__name__, use_external, stream_weights, optimize, progress
        )
        for stale in (onnx_path, data_path):
            stale.unlink(missing_ok=True)
        _phase(progress, "writing")
        with measured(f"export {name}: writing", logger):
            _save(model, Path(scratch), onnx_path, data_path if use_external else None)
            del model

    _phase(progress, "checking")
    with measured(f"export {name}: checking", logger):
        onnx.checker.check_model(str(onnx_path))  # by path: works past 2 GiB with external data
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = tuple(_tensor_spec(v) for v in graph.input)
    outputs = tuple(_tensor_spec(v) for v in graph.output)
    _check_against_spec(spec, inputs, outputs, onnx_path)
    op_types = dict(sorted(Counter(n.op_type for n in graph.node).items()))
    export_s = time.perf_counter() - t0

    ext = data_path if use_external and data_path.exists() else None
    artifact = OnnxArtifact(
        path=onnx_path,
        inputs=inputs,
        outputs=outputs,
        opset=spec.opset,
        size=onnx_path.stat().st_size + (ext.stat().st_size if ext else 0),
        sha256=sha256_file(onnx_path),
        external_data=ext,
        external_data_sha256=sha256_file(ext) if ext else None,
        n_nodes=len(graph.node),
        op_types=op_types,
        export_s=export_s,
    )
    logger.info(
        "export %s: %d nodes, %.1f MiB, %.1f s, peak RSS %.0f MiB; wrote %s",
        name,
        artifact.n_nodes,
        artifact.size / 2**20,
        export_s,
        _peak_rss_mib(),
        ", ".join(str(p) for p in artifact.files),
    )
    return artifact


def _cleaned_up(
    raw_path: Path,
    params: dict[str, torch.Tensor],
    name: str,
    kind: str,
    use_external: bool,
    stream_weights: bool,
    optimize: bool,
    progress: Progress | None,
) -> onnx.ModelProto:
    """The traced graph at ``raw_path`` (in its scratch folder), its streamed weights attached (``params``, emptied)
    and cleaned up (``optimize``); BuildError if it spilled to external data that ``use_external`` forbids."""
    import onnx

    # Past 2 GiB the exporter has written one file per tensor, and with stream_weights the weights are
    # written from the module here: keep them on disk (they are streamed into the single data file) and
    # skip the graph cleanup, which would need them all in memory.
    model = onnx.load(str(raw_path), load_external_data=False)
    if stream_weights:
        with measured(f"export {name}: streaming the weights", logger):
            _attach_weights(model, params, raw_path.parent / "weights.bin")
        params.clear()
    exported_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if exported_external and not use_external:
        raise BuildError(
            f"the exported graph of {kind} exceeds protobuf's 2 GiB limit; it needs external_data=True (or None)"
        )
    if optimize and exported_external:
        why = "weights streamed" if stream_weights else "graph over 2 GiB"
        logger.info("export %s: %s, skipping the graph-surgeon cleanup", name, why)
    if optimize and stream_weights:
        # what the cleanup changes in a graph the exporter already constant-folded (measured on tiny-flux
        # fp8/int8/nvfp4): its Constant nodes become initializers, Q/DQ scales included
        _constants_to_initializers(model)
    elif optimize:
        _phase(progress, "cleaning up the graph")
        with measured(f"export {name}: graph cleanup", logger):
            model = _optimize(model)
    return model


def _trace(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    spec: ExportSpec,
    raw_path: Path,
    patches: Sequence[str | Patch] | None,
    params: dict[str, torch.Tensor] | None,
) -> None:
    """``torch.onnx.export`` (TorchScript) into ``raw_path`` with dtcompile's patches; with ``params``, the
    weights are kept out of the graph and collected there (``_weights_kept_out``)."""
    import torch

    with (
        _rms_norm_symbolic(spec.opset),
        _gelu_symbolic(spec.opset),
        _patched(patches),
        _weights_kept_out(params),
        warnings.catch_warnings(),
    ):
        # The legacy exporter warns on every call that it is deprecated, and on every traced Python
        # condition; neither is actionable here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        # torch.onnx.export traces in eval mode and afterwards restores the *wrapper's* mode recursively: a
        # fresh wrapper is in training mode, so without this every module inside it (T5's dropout 0.1, CLIP's
        # attention dropout) would come out in training mode and each parity reference after it be noise.
        module.eval()
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    args,
                    str(raw_path),
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(),
                    opset_version=spec.opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except OSError:  # the machine (full or read-only disk), not the model: the CLI's one-line OSError
            raise
        except Exception as e:  # the exporter raises many unrelated types; all mean "cannot export"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
            raise BuildError(f"ONNX export of {type(module).__name__} failed: {first}") from e


def _phase(progress: Progress | None, name: str) -> None:
    if progress is not None:
        progress.phase(name)


# --- checks -------------------------------------------------------------------------------------------------


def _check_example_inputs(spec: ExportSpec) -> None:
    """Example inputs must be the spec's inputs, with its dtypes and static dims."""
    names = spec.input_names
    missing = [n for n in names if n not in spec.example_inputs]
    extra = [n for n in spec.example_inputs if n not in names]
    if missing or extra:
        raise BuildError(
            f"ExportSpec example_inputs do not match its inputs: missing {missing}, unexpected {extra} "
            f"(inputs are {names})"
        )
    for t in spec.inputs:
        x = spec.example_inputs[t.name]
        dtype = dtype_name(x.dtype)
        if dtype != t.dtype:
            raise BuildError(f"example input '{t.name}' is {dtype} but the ExportSpec says {t.dtype}")
        shape = tuple(x.shape)
        if len(shape) != len(t.dims) or any(isinstance(d, int) and d != s for d, s in zip(t.dims, shape, strict=True)):
            raise BuildError(f"example input '{t.name}' has shape {shape}, which does not fit the spec's {t.dims}")


def _check_against_spec(
    spec: ExportSpec, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], path: Path
) -> None:
    """The written graph must have exactly the spec's I/O names and dtypes (the exporter drops unused inputs)."""
    for kind, want, got in (("input", spec.inputs, inputs), ("output", spec.outputs, outputs)):
        got_by_name = {t.name: t for t in got}
        dropped = [t.name for t in want if t.name not in got_by_name]
        if dropped:
            raise BuildError(
                f"{path}: graph {kind}s {dropped} of the ExportSpec are missing from the exported graph "
                f"(has {list(got_by_name)}); the exporter drops inputs the module never uses: remove them "
                f"from the spec or use them in the module"
            )
        for t in want:
            if got_by_name[t.name].dtype != t.dtype:
                raise BuildError(
                    f"{path}: {kind} '{t.name}' is {got_by_name[t.name].dtype} in the graph but {t.dtype} in "
                    f"the ExportSpec; make the example input (or the module's output) {t.dtype}"
                )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    import onnx

    tt = value.type.tensor_type
    dtype = from_onnx_name(onnx.TensorProto.DataType.Name(tt.elem_type))
    dims: list[int | str] = []
    for d in tt.shape.dim:
        dims.append(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?")
    return TensorSpec(value.name, dtype, tuple(dims))


# --- weights kept out of the exporter ----------------------------------------------------------------------


@contextlib.contextmanager
def _weights_kept_out(params: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """While active, torch's ONNX encoder gets an empty weight table: the weights stay graph inputs (as with
    ``export_params=False``) and ``params`` collects them, name -> tensor (the module's own tensors, or the
    few the exporter's constant folding made). ``None``: nothing changes."""
    if params is None:
        yield
        return
    import torch

    graph_type: Any = torch._C.Graph  # its private _export_onnx is not in torch's stubs
    encode = graph_type._export_onnx

    def encode_without_weights(self: Any, params_dict: dict[str, torch.Tensor], *args: Any) -> Any:
        params.update(params_dict)
        return encode(self, {}, *args)

    graph_type._export_onnx = encode_without_weights
    try:
        yield
    finally:
        graph_type._export_onnx = encode


def _attach_weights(model: onnx.ModelProto, params: dict[str, torch.Tensor], data_file: Path) -> None:
    """Turn the graph inputs the exporter left for ``params`` into initializers, as torch would have written
    them (same names, element types, dims and bytes), each written from its tensor to ``data_file`` (or inline
    under 1 KiB) one at a time."""
    import onnx
    import torch

    offset = 0
    inputs = list(model.graph.input)
    keep = [v for v in inputs if v.name not in params]
    with open(data_file, "wb") as out:
        for value in inputs:
            if value.name not in params:
                continue
            t = params[value.name].detach()
            tensor = onnx.TensorProto(name=value.name, data_type=value.type.tensor_type.elem_type, dims=t.shape)
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
            if data.nbytes < _EXTERNAL_MIN_BYTES:
                tensor.raw_data = data.tobytes()
            else:
                for key, entry in (("location", data_file.name), ("offset", offset), ("length", data.nbytes)):
                    ext = tensor.external_data.add()
                    ext.key, ext.value = key, str(entry)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                out.write(data.data)  # the array's buffer
                offset += data.nbytes
                pad = -offset % 64
                out.write(b"\0" * pad)
                offset += pad
            model.graph.initializer.append(tensor)
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Every top-level ``Constant`` node holding a tensor (``value``) becomes an initializer of its output's
    name, as graph-surgeon's cleanup writes them; the weights are not touched."""
    keep = []
    for node in model.graph.node:
        attrs = list(node.attribute)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and [a.name for a in attrs] == ["value"]:
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
        else:
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


# --- graph cleanup and saving -------------------------------------------------------------------------------


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, remove dead nodes and topologically sort (onnx-graphsurgeon)."""
    import onnx_graphsurgeon as gs

    t0 = time.perf_counter()
    from onnx_graphsurgeon.logger import G_LOGGER

    # Folding tries onnxruntime on subgraphs; TensorRT custom ops (quantized graphs) make it warn, harmlessly.
    G_LOGGER.severity = G_LOGGER.ERROR
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    # fold_shapes=True only folds Shape ops whose dims are all concrete, so dynamic axes survive.
    graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
    optimized = gs.export_onnx(graph, do_type_check=False)
    # gs.export_onnx does not carry these over.
    optimized.ir_version = model.ir_version
    optimized.producer_name, optimized.producer_version = model.producer_name, model.producer_version
    logger.info(
        "export: graph cleanup %d -> %d nodes in %.1f s", before, len(optimized.graph.node), time.perf_counter() - t0
    )
    return optimized


def _save(model: onnx.ModelProto, scratch: Path, onnx_path: Path, data_path: Path | None) -> None:
    """Write the model, with its initializers of 1 KiB or more in one ``data_path`` file when given.

    Initializers are either in memory or in the exporter's per-tensor files inside ``scratch``; they are
    streamed into the data file one at a time. Both files are written in ``scratch`` (same filesystem) and
    renamed into place, data first, so a crash never leaves a half-written graph under the final names.
    """
    import onnx

    final = scratch / "final"
    final.mkdir()
    tmp_onnx = final / onnx_path.name
    if data_path is not None:
        tmp_data = final / data_path.name
        _write_external_data(model, scratch, tmp_data)
    onnx.save_model(model, str(tmp_onnx))
    if data_path is not None:
        # Same mode as the .onnx file (the temporary folder is owner-only).
        os.chmod(tmp_data, stat.S_IMODE(tmp_onnx.stat().st_mode))
        os.replace(tmp_data, data_path)
    os.replace(tmp_onnx, onnx_path)


def _write_external_data(model: onnx.ModelProto, src_dir: Path, data_file: Path) -> None:
    """Move every initializer of at least 1 KiB into ``data_file`` (64-byte aligned) and point the graph at it.

    Inline initializers are written from memory; external ones (relative to ``src_dir``) are copied in
    chunks, so peak memory stays at one chunk whatever the model size.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    offset = 0
    with open(data_file, "wb") as out:
        for tensor in _all_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                src = src_dir / info.location
                start = info.offset or 0
                length = info.length if info.length is not None else src.stat().st_size - start
                copy_byte_range(src, start, length, out.write, f"exported tensor '{tensor.name}'")
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_MIN_BYTES:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue  # small, or typed-field storage (the exporter writes raw_data): stays inline
            del tensor.external_data[:]
            for key, value in (("location", data_file.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += length
            pad = -offset % 64  # aligned offsets let onnxruntime and TensorRT map tensors directly
            out.write(b"\0" * pad)
            offset += pad


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes (Constant nodes), subgraphs included: the exporter may store any of
    them in its scratch files."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextlib.contextmanager
def _patched(patches: Sequence[str | Patch] | None) -> Iterator[None]:
    """Every selected patch active, entered in order and exited in reverse."""
    with contextlib.ExitStack() as stack:
        for patch in resolve_patches(patches):
            stack.enter_context(patch())
        yield


__all__ = ["EXTERNAL_DATA_THRESHOLD", "OnnxArtifact", "export_onnx"]
