"""Cache diffusion: per-block engines and a runtime that skips cached blocks on chosen steps.

- ``spec``: the ``cache:`` recipe section, block names, segments and step rules (plain Python, no torch).
- ``split``: the transformer cut into prologue / block-segment / epilogue graphs, exported and checked.
- ``runtime``: the stitched engine module that runs the parts and skips cached segments.

Importing this package loads no torch, diffusers, onnx or TensorRT.
"""
