"""Q/DQ graphs of a quantized export, one job per module (import from them; this package re-exports nothing):

- ``standardize``: TensorRT custom Q/DQ ops in, standard ONNX Q/DQ out (``standardize_qdq``, ``standardize_file``),
  fp8 activations rewritten to standard Q/DQ.
- ``weights``: fp8/int8 weight folding (``W -> Q -> DQ`` becomes a quantized initializer ``-> DQ``).
- ``fp4``: NVFP4 packing and decoding, and the rewrite of TensorRT's FP4 ops.
- ``reference``: the float32 / FP4-emulated copy onnxruntime runs for parity checks (``onnxruntime_copy``).
- ``report``: ``QdqReport`` (the manifest's ``qdq`` entry) and graph inspections (``count_fp8_attention``).
- ``graph``: the graph view (``Graph``) and the node edits the rewrites share.
- ``external``: external data read and written one tensor at a time (``ExternalData``).
"""
