"""ONNX weight I/O: an ONNX graph's initializers read one at a time, as torch tensors, without parsing the model.

``OnnxWeights`` indexes the initializers straight from the protobuf wire format (memory-mapped): a refit of a
multi-GB graph reads only the tensors it touches, inline or from external data. ``tensor_bytes`` gives a
tensor's bytes as ONNX ``raw_data`` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.dtypes import ONNX_WEIGHT_TYPES, torch_dtype
from dtcompile.core.errors import ArtifactError, UnsupportedError

if TYPE_CHECKING:
    import onnx
    import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in row-major order (as ONNX raw_data stores them)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- random access to an ONNX graph's weights -------------------------------------------------------------------


@dataclass
class _TensorIndex:
    """Where an initializer's data sits, read from the protobuf wire format without parsing the model."""

    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None  # (offset, length) of raw_data inside the .onnx file
    external: dict[str, str] = field(default_factory=dict)  # location/offset/length when stored externally
    typed: bool = False  # values in typed fields (float_data, ...) instead of raw_data


def _varint(buf: Any, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Any:
    """(field number, wire type, value or (start, end)) of each field of one protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield num, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            yield num, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield num, wire, (i, i + n)
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _scan_initializers(buf: Any) -> dict[str, _TensorIndex]:
    """ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto fields: dims 1, data_type 2,
    name 8, raw_data 9, external_data 13 (key 1 / value 2), typed data 4-7, 10, 11."""
    out: dict[str, _TensorIndex] = {}
    for num, wire, graph in _fields(buf, 0, len(buf)):
        if num != 7 or wire != 2:
            continue
        for gnum, gwire, span in _fields(buf, *graph):
            if gnum != 5 or gwire != 2:
                continue
            name, dims, dtype, raw, ext, typed = "", [], 0, None, {}, False
            for tnum, twire, v in _fields(buf, *span):
                if tnum == 1:
                    if twire == 0:
                        dims.append(v)
                    else:  # packed
                        j, stop = v
                        while j < stop:
                            d, j = _varint(buf, j)
                            dims.append(d)
                elif tnum == 2:
                    dtype = v
                elif tnum == 8:
                    name = bytes(buf[v[0] : v[1]]).decode()
                elif tnum == 9:
                    raw = (v[0], v[1] - v[0])
                elif tnum == 13:
                    key = value = ""
                    for enum, _, ev in _fields(buf, *v):
                        text = bytes(buf[ev[0] : ev[1]]).decode()
                        key, value = (text, value) if enum == 1 else (key, text)
                    ext[key] = value
                elif tnum in (4, 5, 6, 7, 10, 11):
                    typed = True
            out[name] = _TensorIndex(tuple(dims), dtype, raw, ext, typed)
    return out


class OnnxWeights:
    """An ONNX graph whose initializers are read one at a time (inline or external data), as torch tensors.

    Opening one indexes the initializers from the protobuf wire format (memory-mapped, no parse): a refit of a
    multi-GB graph reads only the tensors it touches. ``model`` (the parsed graph, external data not loaded)
    is loaded on first use.
    """

    def __init__(self, onnx_path: Path) -> None:
        import mmap

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: ONNX file not found; rebuild or re-pull the artifact")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                self.inits: dict[str, _TensorIndex] = _scan_initializers(buf)
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise ArtifactError(f"{self.path}: not a readable ONNX file ({exc})") from None
        self._model: Any = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            import onnx

            self._model = onnx.load(str(self.path), load_external_data=False)
        return self._model

    def proto(self, name: str) -> onnx.TensorProto:
        return next(t for t in self.model.graph.initializer if t.name == name)

    def dtype(self, name: str) -> str | None:
        return ONNX_WEIGHT_TYPES.get(self.inits[name].data_type)

    def dims(self, name: str) -> tuple[int, ...]:
        return self.inits[name].dims

    def external(self, name: str) -> tuple[Path, int, int] | None:
        """(data file, offset, length) of an external initializer, None when it is inline."""
        ext = self.inits[name].external
        if "location" not in ext:
            return None
        path = self.path.parent / ext["location"]
        offset = int(ext.get("offset", 0))
        length = int(ext["length"]) if "length" in ext else path.stat().st_size - offset
        return path, offset, length

    def raw(self, name: str) -> bytearray:
        """The initializer's bytes as raw_data stores them (a fresh buffer the caller owns)."""
        idx = self.inits[name]
        ext = self.external(name)
        path, offset, length = ext if ext is not None else (self.path, *(idx.raw or (0, 0)))
        if ext is None and idx.raw is None:
            if not idx.typed:
                return bytearray()
            from onnx import numpy_helper

            return bytearray(numpy_helper.to_array(self.proto(name)).tobytes())  # typed fields (float_data, ...)
        data = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(data)
        if got != length:
            raise ArtifactError(f"{path}: data of '{name}' is truncated; rebuild or re-pull the artifact")
        return data

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        dtype = self.dtype(name)
        if dtype is None:
            raise UnsupportedError(f"{self.path}: initializer '{name}' has an element type refit cannot handle")
        data = self.raw(name)
        dims = self.dims(name)
        if not data:
            return torch.empty(dims, dtype=torch_dtype(dtype))
        return torch.frombuffer(data, dtype=torch_dtype(dtype)).reshape(dims)  # owns ``data``: no copy
