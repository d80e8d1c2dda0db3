"""The TensorRT side of the plugin: an IPluginV3 written in Python that runs the Triton kernel.

Input: a TensorRT Python module (``tensorrt``); ``register(trt)`` adds the ``FusedAttention`` creator (namespace
``dtc``, version 1) to its plugin registry, so the ONNX parser resolves ``dtc::FusedAttention`` nodes to it and a
runtime can deserialize engines that contain it. Output of the layer: (B, H, Sq, D) like its first input.

Formats: linear float16 or bfloat16, all three inputs and the output of one type. At run time ``enqueue`` wraps
TensorRT's device buffers as torch tensors (``__cuda_array_interface__``) and launches the kernel on TensorRT's
stream. Building needs no GPU work from the plugin (it reports shapes and formats only); running needs CUDA
torch and triton in the process.

TensorRT-RTX cannot use this plugin: see ``dtcompile.attention.modes.RTX_PLUGIN_REASON``.
"""

from __future__ import annotations

import functools
from typing import Any

from . import NAME, NAMESPACE, VERSION


class _DeviceArray:
    """A raw device pointer as ``__cuda_array_interface__`` (bfloat16 travels as int16 and is viewed back)."""

    _TYPESTR = {"float16": "<f2", "bfloat16": "<i2", "float32": "<f4"}

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": self._TYPESTR[dtype],
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def _as_tensor(ptr: int, dims: Any, dtype: str) -> Any:
    import torch

    t = torch.as_tensor(_DeviceArray(int(ptr), tuple(int(d) for d in dims), dtype), device="cuda")
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@functools.cache
def plugin_classes(trt: Any) -> tuple[type, type]:
    """(plugin class, creator class) bound to the TensorRT module ``trt``."""
    plugin_cls = _plugin_class(trt)
    return plugin_cls, _creator_class(trt, plugin_cls)


def _plugin_class(trt: Any) -> type:
    """The IPluginV3 class bound to ``trt`` (one function per class keeps each under the complexity bound)."""
    import numpy as np

    type_names = {trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}

    class FusedAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, scale: float = 0.0, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = NAMESPACE
            self.plugin_name = NAME
            self.plugin_version = VERSION
            self.timing_cache_id = ""
            self.scale = float(scale)
            self.phase = phase

        def get_capability_interface(self, type: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[0])]

        def get_fields_to_serialize(self) -> Any:
            field = trt.PluginField("scale", np.array([self.scale], dtype=np.float32), trt.PluginFieldType.FLOAT32)
            return trt.PluginFieldCollection([field])

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            return (
                desc.format == trt.TensorFormat.LINEAR and desc.type in type_names and desc.type == in_out[0].desc.type
            )

        def configure_plugin(self, inp: Any, out: Any) -> None:
            pass

        def on_shape_change(self, inp: Any, out: Any) -> None:
            pass

        def get_workspace_size(self, inp: Any, out: Any) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def enqueue(
            self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: Any, stream: int
        ) -> None:
            import torch

            from .kernel import flash_attention

            dtype = type_names[input_desc[0].type]
            q, k, v = (_as_tensor(inputs[i], input_desc[i].dims, dtype) for i in range(3))
            out = _as_tensor(outputs[0], output_desc[0].dims, dtype)
            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
                flash_attention(q, k, v, self.scale or None, out=out)

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def clone(self) -> Any:
            twin = FusedAttentionPlugin(self.scale, self.phase)
            twin.__dict__.update(self.__dict__)
            return twin

    return FusedAttentionPlugin


def _creator_class(trt: Any, plugin_cls: type) -> type:
    """The IPluginCreatorV3One class bound to ``trt``, creating ``plugin_cls`` instances."""
    import numpy as np

    class FusedAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = NAME
            self.plugin_namespace = NAMESPACE
            self.plugin_version = VERSION
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField("scale", np.array([], dtype=np.float32), trt.PluginFieldType.FLOAT32)]
            )

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            scale = 0.0
            for field in fc:
                if field.name == "scale":
                    scale = float(np.asarray(field.data).ravel()[0])
            return plugin_cls(scale, phase)

    return FusedAttentionCreator


_CREATORS: dict[int, Any] = {}  # id(trt module) -> creator (kept alive: the registry holds a borrowed pointer)


def register(trt: Any) -> bool:
    """Register the creator with ``trt``'s plugin registry once per process; True when it is (now) registered."""
    if id(trt) in _CREATORS:
        return True
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    ok = bool(trt.get_plugin_registry().register_creator(creator, NAMESPACE))
    if ok:
        _CREATORS[id(trt)] = creator
    return ok
