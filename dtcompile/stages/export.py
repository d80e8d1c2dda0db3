"""Export stage: a torch module and its ExportSpec in, an ONNX graph on disk (OnnxArtifact) out.

Input: the module to export (a wrapper taking the graph inputs positionally and returning one tensor, see
``ModelAdapter.export_module``) and its ``ExportSpec`` (I/O names, dtypes, symbolic dims, example inputs,
opset). Output: ``<out_dir>/<name>.onnx`` (plus ``<name>.onnx.data`` when the weights are stored as ONNX
external data) and an ``OnnxArtifact`` describing it with checksums.

The legacy TorchScript exporter (``dynamo=False``) is used, as NVIDIA's TensorRT demo and ModelOpt do: it is
the one that exports ModelOpt-quantized modules. Two of its traps are fixed during the export only:

- ``aten::rms_norm`` has no symbolic: one is registered that decomposes it into
  Pow/ReduceMean/Add/Sqrt/Div/Mul (computed in fp32 for fp16/bf16 inputs, as torch does).
- diffusers' RoPE (``x.reshape(*x.shape[:-1], -1, 2)``) is traced with constant shapes, so the graph fails at
  any other batch or sequence size; ``apply_rotary_emb`` is swapped for an ``unflatten`` version and restored.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import resource
import stat
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.digests import sha256_file
from dtcompile.core.errors import BuildError, VerificationError
from dtcompile.core.graph import ExportSpec, Range, ShapeProfile, Shapes, TensorSpec
from dtcompile.core.metrics import rel_l2

if TYPE_CHECKING:
    import onnx
    import torch

    from dtcompile.recipe import Recipe
    from dtcompile.stages.load import LoadedPipeline
    from dtcompile.stages.quantize import QuantizedComponent

logger = log = logging.getLogger("dtcompile.export")

#: Above this many bytes of parameters and buffers the weights go to one external data file (protobuf's hard
#: limit is 2 GiB; the margin covers graph constants the exporter adds).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
#: Initializers smaller than this stay inside the .onnx file when external data is used.
_EXTERNAL_MIN_BYTES = 1024

# ONNX TensorProto type names (lower-cased) -> the numpy-style names TensorSpec uses.
_ONNX_DTYPE_NAMES = {"float": "float32", "double": "float64", "float8e4m3fn": "float8_e4m3fn"}


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


def export_onnx(
    module: torch.nn.Module,
    spec: ExportSpec,
    out_dir: Path,
    name: str = "transformer",
    *,
    external_data: bool | None = None,
    optimize: bool = True,
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

    Raises:
        BuildError: the example inputs do not match the spec, the exporter fails, or the written graph's
            inputs/outputs differ from the spec.
    """
    import torch

    out_dir = Path(out_dir)
    _check_example_inputs(spec)
    args = tuple(spec.example_inputs[n] for n in spec.input_names)
    weight_bytes = _module_bytes(module)
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    if not use_external and weight_bytes >= 2**31:
        raise BuildError(
            f"{type(module).__name__} has {weight_bytes / 2**30:.1f} GiB of weights, over protobuf's 2 GiB limit "
            f"for a single .onnx file; use external_data=True (or None)"
        )
    logger.info(
        "export %s: %d inputs, %.1f MiB of weights, opset %d, external data %s",
        name,
        len(args),
        weight_bytes / 2**20,
        spec.opset,
        use_external,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    data_path = out_dir / f"{name}.onnx.data"
    t0 = time.perf_counter()
    # The exporter writes one file per tensor next to the model when it exceeds 2 GiB: export into a private
    # scratch folder on the same filesystem, then write the final files from it.
    with tempfile.TemporaryDirectory(prefix=f".{name}-export-", dir=out_dir) as scratch:
        raw_path = Path(scratch) / f"{name}.onnx"
        with _rms_norm_symbolic(spec.opset), _dynamic_rope(), warnings.catch_warnings():
            # The legacy exporter warns on every call that it is deprecated, and on every traced Python
            # condition; neither is actionable here.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
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
            except Exception as e:  # the exporter raises many unrelated types; all mean "cannot export"
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
                raise BuildError(f"ONNX export of {type(module).__name__} failed: {first}") from e
        trace_s = time.perf_counter() - t0
        logger.info("export %s: traced in %.1f s", name, trace_s)

        import onnx

        # Past 2 GiB the exporter has written one file per tensor: keep the weights on disk (they are streamed
        # into the single data file) and skip the graph cleanup, which would need them all in memory.
        model = onnx.load(str(raw_path), load_external_data=False)
        exported_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if exported_external and not use_external:
            raise BuildError(
                f"the exported graph of {type(module).__name__} exceeds protobuf's 2 GiB limit; "
                f"it needs external_data=True (or None)"
            )
        if optimize and exported_external:
            logger.info("export %s: graph over 2 GiB, skipping the graph-surgeon cleanup", name)
        elif optimize:
            model = _optimize(model)
        for stale in (onnx_path, data_path):
            stale.unlink(missing_ok=True)
        _save(model, Path(scratch), onnx_path, data_path if use_external else None)
        del model

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
        dtype = str(x.dtype).removeprefix("torch.")
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
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
    dims: list[int | str] = []
    for d in tt.shape.dim:
        dims.append(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?")
    return TensorSpec(value.name, _ONNX_DTYPE_NAMES.get(dtype, dtype), tuple(dims))


# --- export-time patches ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rms_norm_symbolic(opset: int) -> Iterator[None]:
    """Register a decomposed ``aten::rms_norm`` symbolic for ``opset`` for the duration of the export.

    Decomposed rather than opset-23 RMSNormalization: TensorRT-RTX and onnxruntime parse the primitive ops and
    TensorRT fuses them back into one normalization layer.
    """
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::rms_norm", opset)


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """ONNX symbolic of ``aten::rms_norm(input, normalized_shape, weight?, eps?)``.

    Follows torch's own kernel: fp16/bf16 inputs are normalized in fp32 and cast back before the weight is
    applied (squaring in fp16 overflows above 256).
    """
    import torch
    from torch.onnx import symbolic_helper as sh

    shape = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = torch.tensor(list(range(-len(shape), 0)), dtype=torch.int64)
    scalar_type = sh._type_utils.JitScalarType.from_value(x, sh._type_utils.JitScalarType.FLOAT)
    in_dtype = scalar_type.dtype()
    # torch's default when eps is None is the dtype's machine epsilon.
    eps_value = torch.finfo(in_dtype).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    upcast = in_dtype in (torch.float16, torch.bfloat16)
    xf = g.op("Cast", x, to_i=sh._type_utils.JitScalarType.FLOAT.onnx_type()) if upcast else x
    compute = torch.float32 if upcast else in_dtype
    two = g.op("Constant", value_t=torch.tensor(2.0, dtype=compute))
    mean_sq = g.op("ReduceMean", g.op("Pow", xf, two), g.op("Constant", value_t=axes), keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(eps_value, dtype=compute))))
    y = g.op("Div", xf, denom)
    if upcast:
        y = g.op("Cast", y, to_i=scalar_type.onnx_type())
    if not sh._is_none(weight):
        y = g.op("Mul", y, weight)
    return y


_ROPE_PARAMS = ("x", "freqs_cis", "use_real", "use_real_unbind_dim", "sequence_dim")


@contextlib.contextmanager
def _dynamic_rope() -> Iterator[None]:
    """Swap diffusers' ``apply_rotary_emb`` for a version whose reshapes stay dynamic, then restore it.

    ``diffusers.models.embeddings.apply_rotary_emb`` splits the head dim with
    ``x.reshape(*x.shape[:-1], -1, 2)``; the tracer records ``x.shape[:-1]`` as constants, so the exported
    graph only runs at the example's batch and sequence length. ``unflatten(-1, (-1, 2))`` exports as a
    shape computation. Every loaded diffusers module that imported the function by name (e.g.
    ``diffusers.models.transformers.transformer_flux``) is patched.
    """
    try:
        from diffusers.models import embeddings
    except ImportError:  # not a diffusers model: nothing to patch
        yield
        return
    original = getattr(embeddings, "apply_rotary_emb", None)
    if original is None or tuple(inspect.signature(original).parameters) != _ROPE_PARAMS:
        logger.warning(
            "diffusers.models.embeddings.apply_rotary_emb is missing or has a new signature; not patching it "
            "(the exported graph may only run at the example shapes)"
        )
        yield
        return

    replacement = _make_dynamic_rope(original)
    patched = [
        m
        for name, m in list(sys.modules.items())
        if (name == "diffusers" or name.startswith("diffusers.")) and getattr(m, "apply_rotary_emb", None) is original
    ]
    for m in patched:
        m.apply_rotary_emb = replacement
    logger.debug("patched apply_rotary_emb in %s", ", ".join(m.__name__ for m in patched))
    try:
        yield
    finally:
        for m in patched:
            m.apply_rotary_emb = original


def _make_dynamic_rope(original: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_rotary_emb`` with the same numerics, using ``unflatten`` instead of a shape-built reshape."""
    import torch

    def apply_rotary_emb(
        x: torch.Tensor,
        freqs_cis: Any,
        use_real: bool = True,
        use_real_unbind_dim: int = -1,
        sequence_dim: int = 2,
    ) -> torch.Tensor:
        if not use_real or use_real_unbind_dim not in (-1, -2) or sequence_dim not in (1, 2):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis  # [S, D]
        if sequence_dim == 2:
            cos, sin = cos[None, None, :, :], sin[None, None, :, :]
        else:
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        cos, sin = cos.to(x.device), sin.to(x.device)
        if use_real_unbind_dim == -1:
            x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, S, D//2]
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        else:
            x_real, x_imag = x.unflatten(-1, (2, -1)).unbind(-2)
            x_rotated = torch.cat([-x_imag, x_real], dim=-1)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    return apply_rotary_emb


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


def _write_external_data(model: onnx.ModelProto, src_dir: Path, data_file: Path, chunk: int = 1 << 26) -> None:
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
                with open(src, "rb") as f:
                    f.seek(start)
                    left = length
                    while left:
                        block = f.read(min(chunk, left))
                        if not block:
                            raise BuildError(f"exporter output {src} is shorter than its recorded length")
                        out.write(block)
                        left -= len(block)
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


# --- the export stage proper: a loaded pipeline's component -> ONNX + parity + pipeline files ---

PARITY_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class ExportedComponent:
    """The exported component: its graph, TensorRT shape profile and manifest entry."""

    onnx_path: Path
    profile: ShapeProfile
    manifest: dict[str, Any]


def shapes_from_recipe(shapes: Any) -> Shapes:
    """Recipe ShapesSpec -> the adapters' Shapes."""
    return Shapes(**{k: Range(v.min, v.opt, v.max) for k, v in shapes})


def check_parity(onnx_path: Path, wrapper: Any, spec: ExportSpec, dtype: str) -> dict[str, Any]:
    """onnxruntime vs torch on the export's example inputs; VerificationError beyond the tolerance."""
    import torch

    from dtcompile.backends.onnxruntime import OrtRunner

    runner = OrtRunner(onnx_path, optimization="basic")
    with torch.no_grad():
        ref = wrapper(*spec.example_inputs.values())
    got = runner(dict(spec.example_inputs))[spec.output_names[0]]
    err = rel_l2(got, ref)
    result = {
        "rel_l2": err,
        "max_abs": float((got.double() - ref.double()).abs().max()),
        "tolerance": PARITY_TOL[dtype],
        "inputs": {k: list(v.shape) for k, v in spec.example_inputs.items()},
    }
    log.info("parity onnxruntime vs torch: rel L2 %.2e (tolerance %.0e)", err, PARITY_TOL[dtype])
    if not err <= PARITY_TOL[dtype]:
        raise VerificationError(
            f"{onnx_path}: onnxruntime output differs from torch by rel L2 {err:.2e} > {PARITY_TOL[dtype]:.0e}; "
            "the export is wrong (not a precision issue)"
        )
    return result


def export_component(
    loaded: LoadedPipeline, recipe: Recipe, artifact_dir: Path, quantized: QuantizedComponent | None = None
) -> ExportedComponent:
    """Export the adapter's component of ``loaded`` into ``artifact_dir/onnx`` and check it against torch.

    With ``quantized`` (the quantize stage's output) the graph is written with standard Q/DQ and checked
    against the fake-quant torch model over its held-out trace (``parity_report``) instead.
    """
    import dataclasses

    from dtcompile.stages.load import torch_dtype

    adapter = loaded.adapter
    comp = adapter.component
    module = getattr(loaded.pipe, comp).eval()
    shapes = shapes_from_recipe(recipe.export.shapes)
    spec = adapter.export_spec(module, loaded.pipe_config, shapes, torch_dtype(recipe.dtype))
    spec = dataclasses.replace(spec, opset=recipe.export.opset)
    wrapper = adapter.export_module(module)
    from dtcompile.attention import export_attention, resolve_attention

    choice = resolve_attention(recipe)  # export.attention: native | plugin | decomposed (docs/attention.md)
    qonnx = None
    with export_attention(choice.mode) as trace:
        if quantized is None:
            art = export_onnx(wrapper, spec, artifact_dir / "onnx", name=comp)
        else:
            from dtcompile.quant.export import export_quantized

            qonnx = export_quantized(
                wrapper, spec, artifact_dir / "onnx", name=comp, quant_format=recipe.quant.format, dtype=recipe.dtype
            )
            art = qonnx.artifact
    profile = adapter.shape_profile(module, loaded.pipe_config, shapes)
    entry: dict[str, Any] = {
        "config": {k: v for k, v in dict(module.config).items() if not k.startswith("_")},
        **art.to_manifest(artifact_dir),
        "attention": {**choice.to_json(), **trace.check_graph(art.op_types)},
        "profile": profile.to_json(),
        "engines": [],
    }
    from dtcompile.tools.refit import write_weight_map

    # torch parameter -> ONNX initializer (name, layout, dtype, Q/DQ scale), recorded once for `dtc refit`
    entry["weight_map"] = write_weight_map(module, art.path, artifact_dir, comp)
    onnx_entry = entry["onnx"]
    if quantized is not None:
        from dtcompile.quant import get_format
        from dtcompile.stages.quantize import parity_report

        fmt = recipe.quant.format
        entry["quant"] = {**quantized.to_manifest(), "graph": qonnx.to_manifest()}
        # parity (b): the graph in onnxruntime against the fake-quant torch model, step by step
        entry["quant"]["parity"] = parity_report(
            loaded.pipe, loaded.adapter, quantized.trace, art.path, fmt
        ).to_manifest()
        if "onnxruntime" in recipe.engine.backends and get_format(fmt).onnxruntime_runnable:
            entry["engines"].append(
                {"backend": "onnxruntime", "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
            )
    elif "onnxruntime" in recipe.engine.backends:
        entry["parity"] = check_parity(art.path, wrapper, spec, recipe.dtype)
        entry["engines"].append(
            {"backend": "onnxruntime", "arch": "any", **{k: onnx_entry[k] for k in ("file", "sha256", "size")}}
        )
    return ExportedComponent(art.path, profile, entry)


def export_pipeline_files(loaded: LoadedPipeline, artifact_dir: Path) -> dict[str, Any]:
    """Save the pipeline minus the engine-backed component into ``artifact_dir/pipeline``."""
    from dtcompile.manifest import file_entry

    pipe = loaded.pipe
    comps = dict(pipe.components)
    comps[loaded.adapter.component] = None
    out = artifact_dir / "pipeline"
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "transformer=None cannot be saved" is the point here
    try:
        type(pipe)(**comps).save_pretrained(out)
    finally:
        dlogging.set_verbosity(level)
    files = [file_entry(artifact_dir, p) for p in sorted(out.rglob("*")) if p.is_file()]
    return {"dir": "pipeline", "files": files}
