"""ONNX weight I/O (``onnx_weights``) and the torch-parameter -> ONNX-initializer weight map (``weight_map``)."""
