"""The bottom layer: facts and helpers every other layer uses, depending on nothing above them.

``errors`` (the user-error hierarchy), ``registry`` (name -> "module:attr" tables), ``targets`` (arches,
backends and which arches each backend targets), ``numerics`` (fp8/int8/fp4 constants and weight
quantizers), ``digests`` (sha256 of files, folders and canonical JSON), ``metrics`` (rel L2, cosine, PSNR),
``versions`` (installed package versions), ``files`` (atomic writes and folder swaps), ``graph`` (the
tensor/shape contracts shared by models, export and backends) and ``progress`` (stage timings).

Nothing here imports torch, onnx or TensorRT at module level, nor any other dtcompile package.
"""
