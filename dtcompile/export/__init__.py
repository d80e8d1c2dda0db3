"""The ONNX exporter (``onnx``) and the upstream patches it applies (``patches``).

Libraries layer: imports dtcompile.core, recipe, manifest, models, attention and backends only.
"""
