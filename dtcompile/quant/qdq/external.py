"""External data of a graph being rewritten: tensors read one at a time from the original data file(s), new
tensors written to the rewritten graph's single data file as they are made.

Input: an ONNX graph loaded without its external data and the folder of its data files. Output: the rewritten
graph's data file (``ExternalData.finish`` copies over, in chunks, every tensor the rewrite left as it was), so
memory holds one weight at a time whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dtcompile.core.errors import BuildError
from dtcompile.core.files import copy_byte_range

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from onnx.external_data_helper import ExternalDataInfo


def _written_span(info: ExternalDataInfo) -> tuple[int, int]:
    """(offset, length) of a tensor ``ExternalData.store`` wrote (it records both; onnx types them as None)."""
    offset: int | None = info.offset
    length: int | None = info.length
    if offset is None or length is None:
        raise BuildError(f"{info.location}: an external data entry without offset or length")
    return offset, length


class ExternalData:
    """The external data of a graph being rewritten: tensors read one at a time from the original data file(s),
    new weights written to the rewritten graph's data file as they are made, never all in memory.

    ``data_file`` (in a scratch folder) becomes the graph's only data file: ``finish`` copies into it, in
    chunks, every tensor still stored in the original files (``src_dir``), so the graph can be saved next to it.
    """

    #: Tensors smaller than this stay inside the .onnx file (as ``export_onnx`` and ``onnx.save_model`` do).
    min_bytes = 1024

    def __init__(self, src_dir: Path, data_file: Path) -> None:
        self.src_dir = Path(src_dir)
        self.path = Path(data_file)
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed by close)
        self.offset = 0
        # Until ``finish``, new tensors point at this location: an absolute path, which no graph's own external
        # data names (the data file may have the same name as an original one).
        self._new_location = str(self.path.resolve())

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of one tensor stored externally, its bytes read (from the original files or the new one)."""
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor

        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)  # metadata only: the data is on disk
        info = ExternalDataInfo(tensor)
        if info.location == self._new_location:
            self._out.flush()
            offset, length = _written_span(info)
            with open(self.path, "rb") as f:
                f.seek(offset)
                loaded.raw_data = f.read(length)
            del loaded.external_data[:]
            loaded.data_location = onnx.TensorProto.DEFAULT
        else:
            load_external_data_for_tensor(loaded, str(self.src_dir))
        return loaded

    def value(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of one tensor stored externally (in the original files, or already in the new one)."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.loaded(tensor))

    def store(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """Write a new tensor's ``raw_data`` (1 KiB or more) to the data file; return a new tensor pointing
        there. (A new one: a cleared field does not give its bytes back, they live as long as the message.)"""
        import onnx

        if not (tensor.HasField("raw_data") and len(tensor.raw_data) >= self.min_bytes):
            return tensor
        self._write_aligned(tensor.raw_data)
        pointer = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        self._point(pointer, self.offset - len(tensor.raw_data), len(tensor.raw_data), self._new_location)
        return pointer

    def finish(self, graph: onnx.GraphProto) -> None:
        """Copy every tensor of ``graph`` still in the original files into the data file."""
        import onnx
        from onnx.external_data_helper import ExternalDataInfo

        for tensor, _ in all_tensors(graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            if info.location == self._new_location:  # written by ``store``
                self._point(tensor, *_written_span(info))
                continue
            src = self.src_dir / info.location
            start = info.offset or 0
            length = info.length if info.length is not None else src.stat().st_size - start
            self._align()
            self._point(tensor, self.offset, length)
            copy_byte_range(src, start, length, self._write, f"'{tensor.name}'")

    def close(self) -> None:
        self._out.close()

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int, location: str | None = None) -> None:
        import onnx

        del tensor.external_data[:]
        entries = (("location", location or self.path.name), ("offset", str(offset)), ("length", str(length)))
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def _write_aligned(self, data: bytes) -> None:
        self._align()
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.offset += len(data)

    def _align(self) -> None:
        pad = -self.offset % 64  # aligned offsets let onnxruntime and TensorRT map tensors directly
        self._write(b"\0" * pad)


def has_external_data(graph: onnx.GraphProto) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t, _ in all_tensors(graph))


def all_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """(tensor, is an initializer) for initializers and tensor attributes, subgraphs included."""
    for t in graph.initializer:
        yield t, True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for t in attr.tensors:
                yield t, False
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)
