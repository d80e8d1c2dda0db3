"""dtcompile: ahead-of-time compiler from diffusers pipelines to TensorRT engines.

Importing this package loads no torch, tensorrt, modelopt, diffusers or onnx.
"""

__version__ = "0.1.0"
