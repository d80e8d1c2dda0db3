"""onnxruntime backend: the reference runner for exported graphs (CPU everywhere, CUDA where present)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.backends.base import BuildSettings, EngineJob, Target
from dtcompile.core.digests import sha256_file
from dtcompile.core.dtypes import from_ort
from dtcompile.core.errors import ArtifactError, MissingDependencyError, UnsupportedError

if TYPE_CHECKING:
    import torch


log = logging.getLogger("dtcompile.onnxruntime")


class OrtRunner:
    """Runs an ONNX graph with onnxruntime; feeds and results are torch tensors.

    ``optimization``: "basic" keeps numerics closest to torch (int8 fusions at "all" change them),
    "all" is fastest. ``low_memory``: no CPU memory arena and no memory pattern, so each intermediate is freed
    when done and nothing is kept between runs (same numbers; a real-width FLUX graph: peak 2.2 -> 1.5 GB over
    two runs, each ~10% slower), for checks that run beside a torch model.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        *,
        optimization: str = "all",
        threads: int | None = None,
        low_memory: bool = False,
        initializers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "onnx") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        if low_memory:
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        # initializers given here replace the graph's of the same name (a LoRA swap in a live server); the
        # OrtValues must outlive the session, so the runner keeps them
        self._overrides = [(name, ort_value(t)) for name, t in sorted((initializers or {}).items())]
        for name, value in self._overrides:
            opts.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).splitlines()[0][:300]
            raise ArtifactError(f"{onnx_path}: onnxruntime cannot load the graph ({first})") from None
        self.input_types = {i.name: from_ort(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = "cpu"

    @property
    def input_names(self) -> list[str]:
        return list(self.input_types)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        missing = set(self.input_types) - set(feeds)
        if missing:
            raise ValueError(f"missing graph inputs: {sorted(missing)}")
        arrays: dict[str, Any] = {}
        for name, dtype in self.input_types.items():
            t = feeds[name].detach().to("cpu", getattr(torch, dtype))
            arrays[name] = t.contiguous().numpy()
        outs = self.session.run(self.output_names, arrays)
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outs, strict=True)}


def ort_value(t: torch.Tensor) -> Any:
    """A CPU ``OrtValue`` over tensor ``t``'s memory (bfloat16 and fp8 passed as their raw bits with their
    ONNX element type, since numpy has neither)."""
    import onnxruntime as ort
    import torch

    from dtcompile.core.dtypes import TO_ONNX, dtype_name

    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = t.view(torch.uint16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TO_ONNX[dtype_name(t.dtype)])
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


class OnnxruntimeBackend:
    """The reference backend: the exported ONNX graph is its engine, runnable on any machine."""

    name: ClassVar[str] = "onnxruntime"
    archs: ClassVar[tuple[str, ...]] = ("any",)

    def supports(self, target: Target, settings: BuildSettings) -> str | None:
        """None when onnxruntime is installed (it needs no GPU and builds nothing)."""
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'dtcompile[onnx]')"
        return None

    def build(self, job: EngineJob, target: Target, settings: BuildSettings) -> dict[str, Any]:
        """The engine entry pointing at the ONNX graph itself (nothing is copied)."""
        path = Path(job.onnx_path)
        return {
            "backend": self.name,
            "arch": "any",
            "file": path.relative_to(job.artifact_dir).as_posix(),
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }

    def open_runner(self, path: Path, entry: dict[str, Any], *, threads: int | None = None) -> OrtRunner:
        """An ``OrtRunner`` over the graph (``threads`` intra-op threads; None: onnxruntime's default)."""
        return OrtRunner(path, threads=threads)

    def refit(
        self, engine_path: Path, updates: dict[str, Any], out_path: Path, missing: Callable[[str], Any]
    ) -> dict[str, Any]:
        """onnxruntime runs the refit ONNX graph itself: there is no engine to refit."""
        raise UnsupportedError("onnxruntime has no engine to refit: the refit ONNX graph is its artifact")
