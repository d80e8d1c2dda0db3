"""Attention in the exported graph: the ONNX ``Attention`` op, the fused-attention plugin, or MatMul-Softmax-MatMul.

Three modules, one job each (import from them; this package re-exports nothing):

- ``modes``: the plan-time choice. A recipe (``export.attention``, dtype, opset, ``quant.quantize_mha``) and the
  (backend, arch) of its engines in; an ``AttentionChoice`` out (``resolve_attention``, ``mode_blocker``), or an
  UnsupportedError naming the backend, the arch and what it lacks.
- ``router``: the export-time hook. ``export_attention(mode)`` routes diffusers' attention through
  ``attention()``, which emits the chosen form, and counts what it emitted (``AttentionTrace``) so the graph can
  be checked.
- ``plugin``: the fused-attention plugin on the build side (``load_plugin``, ``graph_plugin_ops``,
  ``register_build_plugins``: registration with a TensorRT build and the manifest records).

Modes (all take (B, heads, S, head_dim) q/k/v, as torch SDPA does):

- ``native``: one opset-23 ``Attention`` node per attention call (4-D inputs, heads read from the shape, no
  ``softmax_precision``: TensorRT refuses it). TensorRT maps it to its fused attention layer; onnxruntime runs it.
- ``plugin``: one ``dtc::FusedAttention`` node (``dtcompile.plugins.fused_attention``), which TensorRT's ONNX
  parser resolves to the plugin registered with the build; on the torch side it is the custom op
  ``dtc::fused_attention``.
- ``decomposed``: ``torch.nn.functional.scaled_dot_product_attention``, whose legacy ONNX symbolic is
  MatMul-Softmax-MatMul (scale split as sqrt(scale) on q and on k).
- ``auto`` (recipe only): ``native`` where every planned (backend, arch) and the dtype support it and the opset is
  at least 23, else ``decomposed``; the reason is logged and recorded.

fp8 attention (``quant.quantize_mha``): ModelOpt's quantized attention replaces
``torch.nn.functional.scaled_dot_product_attention`` while a quantized attention module runs. ``attention()``
then calls that replacement whatever the mode, so Q/K/V/softmax keep the fp8 Q/DQ MatMul-Softmax-MatMul form
TensorRT fuses into fp8 attention; the manifest records those calls as ``quantized``. The plugin refuses fp8.

``router.attention()`` is the single patch point: the dispatch replacement looks it up on ``router`` at call
time, so another stage may wrap it (``dtcompile.attention.router.attention = wrapped``) for its own context.
"""
