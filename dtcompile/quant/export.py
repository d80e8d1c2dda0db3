"""Running and exporting a ModelOpt-quantized component: fp8 attention, CPU stand-ins, Q/DQ export.

Input: a component quantized in place by ``mtq.quantize`` (fake-quant modules), its ``ExportSpec``.
Output: ``export_quantized`` writes ``<out_dir>/<name>.onnx`` through ``dtcompile.export.onnx.export_onnx``
(same I/O, dynamic axes and upstream patches as unquantized exports), then rewrites it to standard
ONNX Q/DQ with ``dtcompile.quant.qdq`` and returns the refreshed ``OnnxArtifact`` plus a ``QdqReport``.

Three things ModelOpt does not do the way a portable build needs, done here:

- fp8 attention (``quantize_mha``): ModelOpt's own fp8 SDPA export accepts only fp16/bf16 models and its
  torch forward never quantizes the softmax output, so the exported graph and the fake-quant model differ.
  ``enable_fp8_attention`` swaps in one implementation for both: Q and K are scaled by sqrt(softmax scale)
  and fp8-quantized (ranges calibrated on the scaled tensors), the softmax output is fp8-quantized with the
  fixed range [0, 1] (scale 1/448) and V with its calibrated range. In ONNX that is
  ``Q/DQ(q) -> MatMul <- Q/DQ(k^T); Softmax -> Q/DQ -> MatMul <- Q/DQ(v)``, TensorRT's fp8 attention
  pattern; the torch forward computes exactly that.
- NVFP4 on the CPU: see ``dtcompile.quant.nvfp4.cpu_fake_quant``.
- NVFP4 export: the block-scaled DequantizeLinear needs opset 21+, which the TorchScript exporter cannot
  write; a placeholder op is written instead and ``qdq`` turns it into the real op (opset 23).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import BuildError
from dtcompile.core.numerics import FP8_E4M3_MAX, fp8_fake_quant
from dtcompile.core.progress import measured
from dtcompile.quant import get_format
from dtcompile.quant.qdq.fp4 import FP4_BLOCK_DQ_PLACEHOLDER
from dtcompile.quant.qdq.graph import TRT_DOMAIN
from dtcompile.quant.qdq.report import QdqReport
from dtcompile.quant.qdq.standardize import standardize_file

if TYPE_CHECKING:
    import torch

    from dtcompile.core.graph import ExportSpec
    from dtcompile.core.progress import Progress
    from dtcompile.export.onnx import OnnxArtifact
    from dtcompile.export.patches import Patch

log = logging.getLogger("dtcompile.quant")

#: TensorRT fuses fp8 attention only for head sizes that are a multiple of 16 (ModelOpt's rule too).
MHA_HEAD_MULTIPLE = 16
_ATTN_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")
#: Set by ``float32_compute`` on fp8 attentions: the dtype whose constants the graph holds.
_GRAPH_DTYPE_ATTR = "_dtc_graph_dtype"


@dataclass(frozen=True)
class QuantizedOnnx:
    """A quantized component's graph: the artifact (standard Q/DQ) and what the Q/DQ rewrite found."""

    artifact: OnnxArtifact
    qdq: QdqReport
    fp8_attention: int

    def to_manifest(self) -> dict[str, Any]:
        """Q/DQ counts, custom ops left (and so whether onnxruntime runs it), fp8 attentions."""
        return {**self.qdq.to_manifest(), "fp8_attention": self.fp8_attention}


# --- fp8 attention -------------------------------------------------------------------------------------------


def _head_dim(module: Any) -> int | None:
    head = getattr(module, "head_dim", None)
    if head:
        return int(head)
    inner, heads = getattr(module, "inner_dim", None), getattr(module, "heads", None)
    return int(inner) // int(heads) if inner and heads else None


def attention_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """ModelOpt-converted attention modules of ``model`` (those carrying Q/K/V bmm quantizers; ModelOpt is
    untyped, and its modules take attributes of its own)."""
    return [(n, m) for n, m in model.named_modules() if all(hasattr(m, q) for q in _ATTN_QUANTIZERS)]


def enable_fp8_attention(model: torch.nn.Module) -> dict[str, list[str]]:
    """Route every eligible converted attention through dtcompile's fp8 attention; disable the rest.

    Eligible: the Q, K and V quantizers are enabled fp8 quantizers and the head size is a multiple of 16.
    Others get their Q/K/V quantizers disabled (they stay high-precision attention). Call it after
    ``mtq.quantize`` converted the modules (before calibrating them) and again after every ``mto.restore``:
    the routing is not part of ModelOpt's saved state.

    Returns ``{"fp8": [names], "disabled": [names]}``.
    """
    import torch.nn.functional as F  # noqa: N812

    done: dict[str, list[str]] = {"fp8": [], "disabled": []}
    for name, module in attention_modules(model):
        quantizers = [getattr(module, q) for q in _ATTN_QUANTIZERS]
        wanted = all(q.is_enabled for q in quantizers)
        if not wanted:
            continue
        head = _head_dim(module)
        if head is None or head % MHA_HEAD_MULTIPLE or not all(q.is_fp8 for q in quantizers):
            for q in quantizers:
                q.disable()
            done["disabled"].append(name)
            continue
        # An instance attribute shadows ModelOpt's class list: only SDPA is replaced, by ours.
        module._functionals_to_replace = [(F, "scaled_dot_product_attention", _fp8_sdpa)]
        done["fp8"].append(name)
    if done["disabled"]:
        log.info(
            "fp8 attention: head size not a multiple of %d, kept high precision: %s",
            MHA_HEAD_MULTIPLE,
            ", ".join(done["disabled"]),
        )
    return done


def _fp8_sdpa(
    self: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """fp8 scaled-dot-product attention of a converted attention module (replaces F.scaled_dot_product_attention
    inside its forward). See the module docstring for the quantization points."""
    import torch

    if dropout_p or enable_gqa:
        raise BuildError("fp8 attention supports inference only (dropout_p=0, no grouped-query attention)")
    if is_causal:
        n, m = query.shape[-2], key.shape[-2]
        causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    if torch.onnx.is_in_onnx_export():
        amax = [float(getattr(self, q).amax) for q in _ATTN_QUANTIZERS]
        return _fp8_attention_function().apply(query, key, value, attn_mask, root, *amax)
    softmax_amax = 1.0
    graph_dtype = getattr(self, _GRAPH_DTYPE_ATTR, None)  # a 16-bit model computing in float32
    if graph_dtype is not None:
        # the constants the 16-bit graph holds: root and the softmax scale rounded to the model's type
        root = float(torch.tensor(root, dtype=graph_dtype))
        softmax_amax = float(fp8_graph_scale(1.0, graph_dtype)) * FP8_E4M3_MAX
    q = self.q_bmm_quantizer(query * root)
    k = self.k_bmm_quantizer(key * root)
    v = self.v_bmm_quantizer(value)
    calibrating = not self.q_bmm_quantizer._if_quant
    return _attention(q, k, v, attn_mask, quantize_softmax=not calibrating, softmax_amax=softmax_amax)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    quantize_softmax: bool,
    softmax_amax: float = 1.0,
) -> torch.Tensor:
    """softmax(q k^T + mask) v with matmuls in fp32 for 16-bit inputs (as the ONNX graph's Casts do)."""
    import torch

    dtype = q.dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    logits = (q.to(wide) @ k.to(wide).transpose(-2, -1)).to(dtype)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    probs = torch.softmax(logits, dim=-1)
    if quantize_softmax:
        probs = fp8_fake_quant(probs, softmax_amax)
    return (probs.to(wide) @ v.to(wide)).to(dtype)


@functools.cache
def _fp8_attention_function() -> type[torch.autograd.Function]:
    """The autograd Function whose ONNX symbolic writes fp8 attention (built on first use: needs torch)."""
    import torch
    from modelopt.torch.quantization.export_onnx import export_fp8
    from torch.onnx import symbolic_helper as sym

    from dtcompile.core.dtypes import TO_ONNX

    onnx_types = {
        trt: TO_ONNX[name] for name, trt in (("float32", "Float"), ("float16", "Half"), ("bfloat16", "BFloat16"))
    }

    class Fp8Attention(torch.autograd.Function):
        """Export-only: forward returns plain attention (traced values), symbolic writes the Q/DQ graph."""

        @staticmethod
        def forward(
            ctx: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attn_mask: torch.Tensor | None,
            root: float,
            amax_q: float,
            amax_k: float,
            amax_v: float,
        ) -> torch.Tensor:
            return _attention(query * root, key * root, value, attn_mask, quantize_softmax=False)

        @staticmethod
        @sym.parse_args("v", "v", "v", "v", "f", "f", "f", "f")
        def symbolic(
            g: Any,
            query: Any,
            key: Any,
            value: Any,
            attn_mask: Any,
            root: float,
            amax_q: float,
            amax_k: float,
            amax_v: float,
        ) -> Any:  # TorchScript graph values (torch._C.Value)
            dtype = query.type().scalarType()
            if dtype not in onnx_types:
                raise BuildError(f"fp8 attention export supports float32/float16/bfloat16 inputs, got {dtype}")
            wide = dtype != "Float"
            torch_dtype = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16}[dtype]

            def widen(x: Any) -> Any:
                return g.op("Cast", x, to_i=onnx_types["Float"]) if wide else x

            def narrow(x: Any) -> Any:
                return g.op("Cast", x, to_i=onnx_types[dtype]) if wide else x

            r = g.op("Constant", value_t=torch.tensor(root, dtype=torch_dtype))
            rank = sym._get_tensor_rank(key) or 4
            perm = list(range(rank))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            q = export_fp8(g, g.op("Mul", query, r), amax_q, None)
            kt = export_fp8(g, g.op("Mul", g.op("Transpose", key, perm_i=perm), r), amax_k, None)
            logits = narrow(g.op("MatMul", widen(q), widen(kt)))
            if not sym._is_none(attn_mask):
                if attn_mask.type().scalarType() == "Bool":
                    zero = g.op("Constant", value_t=torch.tensor(0.0, dtype=torch_dtype))
                    ninf = g.op("Constant", value_t=torch.tensor(float("-inf"), dtype=torch_dtype))
                    attn_mask = g.op("Where", attn_mask, zero, ninf)
                logits = g.op("Add", logits, attn_mask)
            probs = export_fp8(g, g.op("Softmax", logits, axis_i=-1), 1.0, None)
            v = export_fp8(g, value, amax_v, None)
            return narrow(g.op("MatMul", widen(probs), widen(v)))

    return Fp8Attention


# --- float32 reference of a 16-bit component -------------------------------------------------------------------


def fp8_graph_scale(amax: float, dtype: torch.dtype) -> torch.Tensor:
    """The scale ModelOpt's fp8 export writes for ``amax`` in a ``dtype`` graph: 1 / (448 / amax), as a
    float32 tensor rounded to ``dtype`` (``modelopt.torch.quantization.export_onnx.export_fp8``)."""
    import torch

    return torch.tensor(1.0 / (FP8_E4M3_MAX / float(amax))).to(dtype)


def int8_graph_scale(amax: torch.Tensor, dtype: torch.dtype, maxbound: int = 127) -> torch.Tensor:
    """The scale ModelOpt's int8 export writes for ``amax`` (per tensor or per channel) in a ``dtype`` graph:
    amax rounded to ``dtype``, divided by 127 in ``dtype``, 0 replaced by 1 (``export_int8``)."""
    scale = amax.to(dtype) / maxbound
    return scale.masked_fill(scale == 0, 1.0)


@contextlib.contextmanager
def float32_compute(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The fake-quant ``module`` (a ``dtype`` model) computes in float32 for the duration, as the float32 copy
    of its exported graph does (``qdq.reference.float32_copy``), for a parity check at one precision; yields ``module``.

    Its weights are the ``dtype`` weights, exactly. Only the constants the export rounds to ``dtype`` differ
    from a plain ``.float()``: every fp8 and int8 quantizer's amax is set so that its fake quantization uses
    the very scale the graph holds (``fp8_graph_scale``, ``int8_graph_scale``), and the fp8 attentions use the
    graph's sqrt(softmax scale) and softmax scale. NVFP4 quantizers keep their amax: their per-tensor scales are
    float32 in the graph and their block scales are computed at run time.

    No float32 copy of the model is made. The items of the outermost ``ModuleList``s (the blocks) are widened
    one at a time: a forward pre-hook swaps in float32 copies of an item's tensors and a forward hook swaps its
    own back, so at most one item is in float32 at once. Everything else (embedders, final layers) and every
    quantizer's state are widened for the whole duration. On exit, exceptions included, every tensor gets its
    own data back and the hooks and attributes set here are removed: the module is as it was, bit for bit.
    A block's tensors used outside its own call would be seen unwidened (FLUX, FLUX.2, SD3, Wan and T5 give
    the outputs of a float32 copy, to the bit).
    """
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    quantizers = [m for m in module.modules() if isinstance(m, TensorQuantizer)]
    quantizer_tensors = {id(t) for q in quantizers for t in _own_tensors(q)}
    blocks = _blocks(module, (TensorQuantizer, SequentialQuantizer))
    in_blocks = {id(t) for b in blocks for t in _tensors(b)}
    whole: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its own data), swapped back on exit
    per_block: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {id(b): [] for b in blocks}
    handles: list[Any] = []
    attributes: list[tuple[torch.nn.Module, Any]] = []
    missing = object()

    def pre_hook(block: torch.nn.Module, _args: Any) -> None:
        per_block[id(block)].append([])
        _widen(_tensors(block), per_block[id(block)][-1])

    def hook(block: torch.nn.Module, _args: Any, _out: Any) -> None:
        _narrow(per_block[id(block)].pop())

    try:
        # quantizer state: fresh float32 copies (also where already float32), which the amax setter writes into
        _widen([t for q in quantizers for t in _own_tensors(q)], whole, always_copy=True)
        for q in quantizers:
            _round_amax_as_exported(q, dtype)
        _widen(_tensors(module), whole, skip=quantizer_tensors | in_blocks)
        for _, attention in attention_modules(module):
            if attention.__dict__.get("_functionals_to_replace"):
                attributes.append((attention, attention.__dict__.get(_GRAPH_DTYPE_ATTR, missing)))
                setattr(attention, _GRAPH_DTYPE_ATTR, dtype)
        for block in blocks:
            handles.append(block.register_forward_pre_hook(pre_hook))
            handles.append(block.register_forward_hook(hook))
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for stack in per_block.values():  # blocks whose forward raised
            while stack:
                _narrow(stack.pop())
        _narrow(whole)
        for attention, before in reversed(attributes):
            if before is missing:
                delattr(attention, _GRAPH_DTYPE_ATTR)
            else:
                setattr(attention, _GRAPH_DTYPE_ATTR, before)


def _blocks(module: torch.nn.Module, skip: tuple[type, ...]) -> list[torch.nn.Module]:
    """The items of ``module``'s outermost ``ModuleList``s (not looking inside an item, nor inside ``skip``)."""
    import torch

    found: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(m: torch.nn.Module) -> None:
        if isinstance(m, skip):
            return
        if isinstance(m, torch.nn.ModuleList):
            for item in m:
                if id(item) not in seen:
                    seen.add(id(item))
                    found.append(item)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters and buffers, each once."""
    return [*module.parameters(), *module.buffers()]


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _widen(
    tensors: Sequence[torch.Tensor],
    into: list[tuple[torch.Tensor, torch.Tensor]],
    skip: Iterable[int] = (),
    always_copy: bool = False,
) -> None:
    """Swap float32 data into the floating-point ``tensors`` not in ``skip`` that are not float32 yet (with
    ``always_copy``: a float32 copy into all of them), recording (tensor, its own data) in ``into`` as it goes
    for ``_narrow``."""
    import torch

    seen = set(skip)
    for t in tensors:
        if id(t) in seen or not t.is_floating_point() or (t.dtype == torch.float32 and not always_copy):
            continue
        seen.add(id(t))
        own = t.data
        t.data = own.to(torch.float32, copy=True)
        into.append((t, own))


def _narrow(swapped: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each tensor ``_widen`` swapped its own data back (last swapped first)."""
    while swapped:
        t, own = swapped.pop()
        t.data = own


def _round_amax_as_exported(quantizer: Any, dtype: torch.dtype) -> None:
    """Set a float32 quantizer's amax to scale x maxbound, where scale is what a ``dtype`` export writes."""
    import torch

    amax = getattr(quantizer, "_amax", None)
    if not quantizer.is_enabled or amax is None or quantizer.block_sizes:
        return  # disabled, dynamic (NVFP4: float32 scales) or uncalibrated
    if isinstance(quantizer.num_bits, tuple):  # fp8 E4M3: per tensor
        if amax.numel() != 1 or float(amax) <= 0:
            return
        scale = fp8_graph_scale(float(amax), dtype)
        quantizer.amax = scale.to(torch.float32).reshape(amax.shape) * FP8_E4M3_MAX
    elif quantizer.num_bits == 8 and not quantizer.unsigned:
        scale = int8_graph_scale(amax, dtype)
        quantizer.amax = scale.to(torch.float32) * 127


# --- torch forward of a quantized component --------------------------------------------------------------------


@contextlib.contextmanager
def quantized_forward() -> Iterator[None]:
    """Context for running a fake-quant component in torch on any device (NVFP4 CPU stand-in)."""
    from dtcompile.quant.nvfp4 import cpu_fake_quant

    with cpu_fake_quant():
        yield


@contextlib.contextmanager
def quantizers_off(*modules: torch.nn.Module) -> Iterator[None]:
    """The fake-quant ``modules`` compute unquantized for the duration: every enabled ModelOpt quantizer is
    disabled, then enabled again (their calibrated ranges are untouched). A pipeline run then sees the
    original component, e.g. a quantized text encoder while a denoiser's parity runs the pipeline."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [q for m in modules for q in m.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
    for q in enabled:
        q.disable()
    try:
        yield
    finally:
        for q in enabled:
            q.enable()


# --- export ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _fp4_block_dq_placeholder() -> Iterator[None]:
    """Make ModelOpt's NVFP4 symbolic write a placeholder for its block-scaled DequantizeLinear.

    The real op needs opset 21+ (``block_size``), which neither the TorchScript exporter nor the ONNX checker
    at the export's opset accepts; ``qdq.standardize.standardize_qdq`` turns the placeholder into it.
    """
    from modelopt.torch.quantization import export_onnx as mo_export

    original = mo_export._fp4_dequantize_2

    def placeholder(g: Any, inputs: Any, dyn_scale: Any, block_size: int, axis: int = -1) -> Any:
        return g.op(
            f"{TRT_DOMAIN}::{FP4_BLOCK_DQ_PLACEHOLDER}", inputs, dyn_scale, axis_i=axis, block_size_i=block_size
        )

    mo_export._fp4_dequantize_2 = placeholder
    try:
        yield
    finally:
        mo_export._fp4_dequantize_2 = original


def export_quantized(
    module: torch.nn.Module,
    spec: ExportSpec,
    out_dir: Path,
    name: str = "transformer",
    *,
    quant_format: str,
    dtype: str,
    external_data: bool | None = None,
    patches: Sequence[str | Patch] | None = None,
    progress: Progress | None = None,
) -> QuantizedOnnx:
    """Export a fake-quant component to ONNX with standard Q/DQ (custom ops only where ONNX has none).

    Args:
        module: the export wrapper around the quantized component (``ModelAdapter.export_module``).
        spec: I/O specs, example inputs and opset, as for ``export_onnx``.
        out_dir, name, patches, progress: as for ``export_onnx`` (plus a Q/DQ rewrite phase).
        external_data: as for ``export_onnx``, except that the weights are always streamed to an external
            data file (``stream_weights``): ``None`` or ``True``; ``False`` is refused.
        quant_format: the recipe's ``quant.format``.
        dtype: the component's dtype name (float32, float16, bfloat16).

    Raises:
        BuildError: the export or the Q/DQ rewrite failed.
    """
    import onnx
    from modelopt.torch.quantization.export_onnx import configure_linear_module_onnx_quantizers

    from dtcompile.export.onnx import export_onnx
    from dtcompile.quant.nvfp4 import cpu_fake_quant
    from dtcompile.quant.qdq.report import count_fp8_attention

    fmt = get_format(quant_format)  # unknown names fail before the slow export
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_fake_quant(exporting=True))
        stack.enter_context(_fp4_block_dq_placeholder())
        # Block-quantized (NVFP4) weights export as static TRT_FP4QDQ, activations as dynamic quantize.
        stack.enter_context(configure_linear_module_onnx_quantizers(module))
        # The weights never sit in the exporter's in-memory graph, nor in a graph-surgeon copy: each one goes
        # from the module to the external data file, which the Q/DQ rewrite then streams too.
        artifact = export_onnx(
            module,
            spec,
            out_dir,
            name,
            external_data=external_data,
            patches=patches,
            progress=progress,
            stream_weights=True,
        )
    if progress is not None:
        progress.phase("rewriting Q/DQ")
    with measured(f"export {name}: Q/DQ rewrite", log):
        report = standardize_file(artifact.path, dtype)
    unexpected = sorted(set(report.custom_ops) - set(fmt.custom_ops))
    if unexpected:
        raise BuildError(
            f"{artifact.path}: the {quant_format} graph still holds custom ops {unexpected} that dtcompile does not "
            f"turn into standard ONNX (allowed for {quant_format}: {list(fmt.custom_ops) or 'none'}); this "
            f"ModelOpt version exports something new: report it with the ModelOpt version"
        )
    model = onnx.load(str(artifact.path), load_external_data=False)
    artifact = _refreshed(artifact, model.graph, report)
    fp8_attention = count_fp8_attention(model)
    log.info(
        "quantized export %s: %d fp8 Q/DQ, %d int8 Q/DQ, %d fp4 weights, %d fp4 activations, %d fp8 attentions; "
        "custom ops %s",
        artifact.path.name,
        report.fp8_qdq,
        report.int8_qdq,
        report.fp4_weights,
        report.fp4_activations,
        fp8_attention,
        report.custom_ops or "none",
    )
    return QuantizedOnnx(artifact, report, fp8_attention)


def _refreshed(artifact: OnnxArtifact, graph: Any, report: QdqReport) -> OnnxArtifact:
    """The artifact with checksums, size, opset and op counts of the rewritten file."""
    from collections import Counter

    from dtcompile.core.digests import sha256_file

    ext = artifact.external_data if artifact.external_data and artifact.external_data.exists() else None
    return dataclasses.replace(
        artifact,
        opset=report.opset,
        size=artifact.path.stat().st_size + (ext.stat().st_size if ext else 0),
        sha256=sha256_file(artifact.path),
        external_data=ext,
        external_data_sha256=sha256_file(ext) if ext else None,
        n_nodes=len(graph.node),
        op_types=dict(sorted(Counter(n.op_type for n in graph.node).items())),
    )


__all__ = [
    "MHA_HEAD_MULTIPLE",
    "QuantizedOnnx",
    "attention_modules",
    "enable_fp8_attention",
    "export_quantized",
    "float32_compute",
    "fp8_graph_scale",
    "int8_graph_scale",
    "quantized_forward",
    "quantizers_off",
]
