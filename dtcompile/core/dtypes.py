"""Tensor element types: dtcompile's names (torch/numpy style, as ``TensorSpec`` uses them) and what ONNX,
onnxruntime and TensorRT call the same types, in one table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name, ONNX element type, ONNX type name lower-cased (onnxruntime prints "tensor(<it>)"), TensorRT DataType member
_TABLE: tuple[tuple[str, int, str, str | None], ...] = (
    ("float32", 1, "float", "FLOAT"),
    ("uint8", 2, "uint8", "UINT8"),
    ("int8", 3, "int8", "INT8"),
    ("int32", 6, "int32", "INT32"),
    ("int64", 7, "int64", "INT64"),
    ("bool", 9, "bool", "BOOL"),
    ("float16", 10, "float16", "HALF"),
    ("float64", 11, "double", None),
    ("bfloat16", 16, "bfloat16", "BF16"),
    ("float8_e4m3fn", 17, "float8e4m3fn", "FP8"),
    ("float8_e5m2", 19, "float8e5m2", None),
    ("int4", 22, "int4", "INT4"),
    ("float4_e2m1fn", 23, "float4e2m1", "FP4"),
    ("float8_e8m0fnu", 24, "float8e8m0", "E8M0"),
)

#: ONNX type name (lower case) -> dtype name.
FROM_ONNX_NAME: dict[str, str] = {onnx: name for name, _, onnx, _ in _TABLE}
#: TensorRT DataType member name -> dtype name.
FROM_TRT: dict[str, str] = {trt: name for name, _, _, trt in _TABLE if trt}
#: dtype name -> ONNX element type.
TO_ONNX: dict[str, int] = {name: code for name, code, _, _ in _TABLE}
#: The whole-byte types a weight or a Q/DQ scale can have in an ONNX graph: ONNX element type -> dtype name.
ONNX_WEIGHT_TYPES: dict[int, str] = {
    code: name for name, code, _, _ in _TABLE if name not in ("bool", "int4", "float4_e2m1fn", "float8_e8m0fnu")
}


def from_onnx_name(name: str) -> str:
    """The dtype name of an ONNX type name (``"float"`` -> ``"float32"``); an unknown one is returned as is."""
    return FROM_ONNX_NAME.get(name.lower(), name.lower())


def from_ort(type_str: str) -> str:
    """The dtype name of an onnxruntime type string (``"tensor(float16)"`` -> ``"float16"``)."""
    inner = type_str.removeprefix("tensor(").removesuffix(")")
    return FROM_ONNX_NAME.get(inner, type_str)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``"float16"`` -> ``torch.float16``)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype (``torch.float16`` -> ``"float16"``)."""
    return str(dtype).removeprefix("torch.")
