"""The graph view every Q/DQ rewrite works on: name indexes over a GraphProto, constant values (read from disk
one at a time when the graph streams its weights), and the node-level edits the rewrites share.

Input: a GraphProto (and, for a graph with external data, its ``ExternalData``). Output: the same GraphProto,
edited in place by the callers through these helpers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import BuildError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from dtcompile.quant.qdq.external import ExternalData

TRT_DOMAIN = "trt"


#: Weights are quantized this many elements at a time, so the float32 temporaries stay small whatever the
#: weight's size (QuantizeLinear is elementwise: the result is the same).
CHUNK_ELEMENTS = 1 << 22


class Graph:
    """Name indexes over a GraphProto (rebuilt after structural edits); with ``data``, the values of external
    tensors are read one at a time and new initializers go straight to the rewritten data file."""

    def __init__(self, graph: onnx.GraphProto, data: ExternalData | None = None) -> None:
        self.g = graph
        self.data = data
        self.reindex()

    def reindex(self) -> None:
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or a Constant node output, else None."""
        if name in self.inits:
            return self._value(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    return self._value(a.t)
        return None

    def _value(self, tensor: onnx.TensorProto) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.loaded(tensor))

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` with its bytes: itself, or a copy read from disk when it is stored externally."""
        import onnx

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return tensor
        if self.data is None:
            raise BuildError(f"tensor '{tensor.name}' is stored externally but its data was not loaded")
        return self.data.loaded(tensor)

    def new_initializer(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor``, its data moved to the rewritten data file when the graph streams its weights."""
        return tensor if self.data is None else self.data.store(tensor)

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def reroute(g: Graph, old: str, new: str) -> None:
    """Every consumer of tensor ``old`` reads ``new`` instead."""
    for user in g.consumers[old]:
        for i, name_in in enumerate(user.input):
            if name_in == old:
                user.input[i] = new


def to_f32(a: np.ndarray) -> np.ndarray:
    import numpy as np

    return a.astype(np.float32)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def node_attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_node_attr(node: Any, name: str, value: Any) -> None:
    import onnx

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def drop_value_info(graph: Any, name: str) -> None:
    for i, vi in enumerate(graph.value_info):
        if vi.name == name:
            del graph.value_info[i]
            return


def remove_nodes(graph: Any, dead: set[int]) -> None:
    if not dead:
        return
    keep = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(keep)


def drop_unused_initializers(g: Graph) -> None:
    used = {i for n in g.g.node for i in n.input} | g.outputs
    keep = [t for t in g.g.initializer if t.name in used]
    if len(keep) != len(g.g.initializer):
        del g.g.initializer[:]
        g.g.initializer.extend(keep)


def topological_sort(graph: Any) -> None:
    """Order nodes so every input is produced before use (new nodes were appended at the end)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            names = ", ".join(n.name or n.op_type for n in rest[:3])
            raise BuildError(f"quantized graph has a cycle or a dangling input near: {names}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
