"""TensorRT backends: an ONNX graph and a shape profile in, a serialized engine file (EngineInfo) out.

One code path serves both flavours, which differ only in the module and in how the target GPU is chosen:

- ``tensorrt-rtx`` (module ``tensorrt_rtx``): builds on a machine without a GPU for one compute capability
  per build (``IBuilderConfig.set_compute_capability``); networks are always strongly typed (precision comes
  only from the graph's types). REFIT and STRIP_PLAN builds need a GPU.
- ``tensorrt`` (datacenter, module ``tensorrt``): builds only for the GPU it runs on.

The raw TensorRT API is used rather than Polygraphy's loaders: Polygraphy chooses its TensorRT module once
per process from the ``POLYGRAPHY_USE_TENSORRT_RTX`` environment variable (read when ``polygraphy.config``
is imported; every ``polygraphy.backend.trt`` module binds its ``trt`` at import), so it cannot serve both
flavours in one process. This module never imports Polygraphy.

Importing this module loads neither torch nor TensorRT: both are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.backends.base import BuildSettings, EngineJob, Target
from dtcompile.core.dtypes import FROM_TRT
from dtcompile.core.errors import ArtifactError, BuildError, MissingDependencyError, UnsupportedError
from dtcompile.core.files import write_atomic
from dtcompile.core.graph import ShapeProfile, TensorSpec
from dtcompile.core.targets import RTX_BACKEND, TRT_ARCHS, TRT_BACKEND, TRT_EXTRAS, TRT_MODULES, cc_name, gpu_arch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

log = logging.getLogger("dtcompile.tensorrt")


@dataclass(frozen=True)
class EngineInfo:
    """A serialized engine on disk and how it was built.

    ``inputs``/``outputs`` come from the parsed network: dims of -1 are dynamic (bounded by ``profile``).
    ``profile`` is ``ShapeProfile.to_json()`` of the single optimization profile.
    """

    path: Path
    sha256: str
    size: int
    flavour: str
    trt_version: str
    arch: str
    build_s: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, dict[str, list[int]]] = field(hash=False)
    refittable: bool
    strongly_typed: bool
    opt_level: int
    plugins: tuple[dict[str, str], ...] = ()  # plugin records (dtcompile.attention.plugin.register_build_plugins)
    weight_streaming: bool = False
    weights_size: int | None = None  # bytes of the network's weights (recorded for streamable engines)

    def to_manifest(self, artifact_dir: Path) -> dict[str, Any]:
        """The manifest entry: file relative to ``artifact_dir`` and every field that describes the engine.

        ``build_s`` is left out so that rebuilding an identical engine gives an identical manifest entry.
        """
        try:
            rel = self.path.relative_to(artifact_dir).as_posix()
        except ValueError:
            raise ArtifactError(f"engine {self.path} is not inside the artifact folder {artifact_dir}") from None
        return {
            "file": rel,
            "sha256": self.sha256,
            "size": self.size,
            "backend": self.flavour,
            "arch": self.arch,
            "trt_version": self.trt_version,
            "refittable": self.refittable,
            "strongly_typed": self.strongly_typed,
            "opt_level": self.opt_level,
            "profile": self.profile,
            "inputs": [_io_json(t) for t in self.inputs],
            "outputs": [_io_json(t) for t in self.outputs],
            "plugins": [dict(p) for p in self.plugins],
            # streamable engines only, so that other engines' entries stay as they were
            **({"weight_streaming": True, "weights_size": self.weights_size} if self.weight_streaming else {}),
        }


def import_trt(flavour: str) -> Any:
    """Import and return the TensorRT module of ``flavour`` ("tensorrt" or "tensorrt-rtx").

    Raises:
        UnsupportedError: unknown flavour.
        MissingDependencyError: the module is not installed (names the dtcompile extra).
    """
    module = TRT_MODULES.get(flavour)
    if module is None:
        raise UnsupportedError(f"unknown TensorRT flavour '{flavour}'; choose one of: {', '.join(TRT_MODULES)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(module, TRT_EXTRAS[flavour], why=f"needed by the {flavour} backend") from e


def check_build_target(flavour: str, arch: str, *, refittable: bool = False, strongly_typed: bool = True) -> None:
    """Raise unless an engine for ``arch`` can be built with ``flavour`` on this machine.

    Cheap enough for a dry run: imports the TensorRT module (and torch for the GPU check) but builds nothing.

    Raises:
        UnsupportedError: unknown flavour or arch, or a setting this flavour/machine cannot build.
        MissingDependencyError: the flavour's module is not installed.
    """
    if flavour not in TRT_MODULES:
        raise UnsupportedError(f"unknown TensorRT flavour '{flavour}'; choose one of: {', '.join(TRT_MODULES)}")
    archs = TRT_ARCHS[flavour]
    if arch not in archs:
        raise UnsupportedError(f"unknown arch '{arch}' for {flavour}; choose one of: {', '.join(archs)}")
    if flavour == TRT_BACKEND:
        device = gpu_arch()
        if device is None:
            raise UnsupportedError(
                "tensorrt (datacenter) builds only for the GPU it runs on: no CUDA device found; "
                "the tensorrt-rtx backend builds without a GPU"
            )
        if device != arch:
            raise UnsupportedError(
                f"tensorrt (datacenter) builds only for the GPU it runs on: device is {device}, target {arch}"
            )
        import_trt(flavour)
        return
    trt = import_trt(flavour)
    if not strongly_typed:
        raise UnsupportedError(
            "tensorrt-rtx networks are always strongly typed (precision comes from the ONNX graph's types); "
            "strongly_typed=False is only for the datacenter tensorrt flavour"
        )
    if not hasattr(trt.ComputeCapability, cc_name(arch)):
        raise UnsupportedError(
            f"tensorrt_rtx {trt.__version__} cannot target {arch} (no ComputeCapability.{cc_name(arch)}); "
            f"upgrade tensorrt-rtx"
        )
    if refittable and gpu_arch() is None:
        # Checked on tensorrt_rtx 1.7: with BuilderFlag.REFIT (or STRIP_PLAN) the build fails inside Myelin
        # with "CHECK(status == CUDA_SUCCESS) failed" when no GPU is present.
        raise UnsupportedError(
            "a refittable tensorrt-rtx engine needs a CUDA GPU at build time (TensorRT-RTX compiles REFIT "
            "engines with CUDA); build with refittable=False or on a machine with a GPU"
        )


@contextlib.contextmanager
def _interruptible(trt: Any, config: Any, label: str = "build") -> Iterator[threading.Event]:
    """Make Ctrl-C and SIGTERM cancel a running TensorRT build instead of waiting for it to finish, and show
    the build's progress (``label``: its top-level phase's steps, the phase running now next to them).

    TensorRT's build is one C++ call, so Python's own interrupt would only fire once it returns. Here the signal
    sets an event and a progress monitor (``IBuilderConfig.progress_monitor``) returns False at the next step,
    which makes TensorRT abandon the build; the caller raises KeyboardInterrupt once the build call returns.
    """
    from dtcompile.core.progress import Progress

    event = threading.Event()

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: str | None = None  # "Building engine": the phase whose steps the bar counts
            self.bar: Progress | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            log.debug("build phase %s (%d steps)", phase_name, num_steps)
            if parent_phase is None and self.bar is None:
                self.top, self.bar = phase_name, Progress(label, num_steps, heartbeat=True)
            elif self.bar is not None:
                self.bar.note(phase_name)

        def phase_finish(self, phase_name: str) -> None:
            if phase_name == self.top and self.bar is not None:
                self.bar.close()

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name == self.top and self.bar is not None:
                self.bar.update()
            return not event.is_set()

    monitor = _Monitor()
    config.progress_monitor = monitor
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a process started with nohup keeps ignoring it
                previous[sig] = signal.signal(sig, lambda *_: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        config.progress_monitor = None
        if monitor.bar is not None:  # an abandoned build finishes no phase
            monitor.bar.close()
        del monitor


def _parse_network(
    trt: Any, trt_logger: Any, flavour: str, onnx_path: Path, strongly_typed: bool
) -> tuple[Any, Any, Any]:
    """(builder, network, parser) with ``onnx_path`` parsed into the network; BuildError naming the first parser
    error, or an empty graph."""
    builder = trt.Builder(trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else (trt_logger.errors[0] if trt_logger.errors else "no error reported")
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BuildError(f"cannot parse {onnx_path} with {flavour} {trt.__version__}: {first}{more}")
    if network.num_outputs == 0:
        # protobuf parses many non-ONNX byte strings as an empty model: the parser then "succeeds"
        raise BuildError(
            f"cannot parse {onnx_path} with {flavour} {trt.__version__}: the file holds no graph outputs "
            f"(not an ONNX model, or an empty graph)"
        )
    return builder, network, parser


def _builder_config(
    trt: Any, builder: Any, arch: str, flavour: str, refittable: bool, opt_level: int, weight_streaming: bool = False
) -> Any:
    """The builder config: optimization level, REFIT, WEIGHT_STREAMING and the one compute capability of a
    tensorrt-rtx build."""
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:
        # weights may then stay in host memory and stream in under ICudaEngine.weight_streaming_budget_v2
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if flavour == RTX_BACKEND:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, cc_name(arch)), 0)
    return config


def engine_from_onnx(
    onnx_path: Path,
    profile: ShapeProfile,
    arch: str,
    flavour: str,
    out_path: Path,
    *,
    strongly_typed: bool = True,
    refittable: bool = False,
    opt_level: int = 3,
    timing_cache: Path | None = None,
    weight_streaming: bool = False,
) -> EngineInfo:
    """Build a serialized engine for ``arch`` from an ONNX file and write it atomically to ``out_path``.

    Args:
        onnx_path: the graph; external data is read from next to it.
        profile: min/opt/max shapes of every dynamic input (one optimization profile).
        arch: target GPU arch, e.g. "sm_89" (one of ``TRT_ARCHS[flavour]``).
        flavour: "tensorrt-rtx" or "tensorrt".
        out_path: engine file; written as ``<out_path>.tmp`` then renamed.
        strongly_typed: precision from the graph's types (always on for tensorrt-rtx).
        refittable: build with BuilderFlag.REFIT (weights can be replaced without a rebuild).
        opt_level: builder optimization level, 0-5.
        timing_cache: datacenter tensorrt only: loaded if it exists and written back after the build;
            TensorRT-RTX has no timing cache (its timing-cache calls are no-ops), so it is ignored there.
        weight_streaming: build with BuilderFlag.WEIGHT_STREAMING (the runtime may then give the engine a
            device budget smaller than its weights); the entry records ``weights_size``, the network's weight
            bytes. How many of them can stream (``streamable_weights_size``) needs the deserialised engine (a GPU).

    Raises:
        UnsupportedError, MissingDependencyError: see ``check_build_target``.
        ArtifactError: the ONNX file is missing or the timing cache does not match this TensorRT/device.
        BuildError: the parser or the builder failed (the message names the file and the first error).
    """
    check_build_target(flavour, arch, refittable=refittable, strongly_typed=strongly_typed)
    if not 0 <= opt_level <= 5:
        raise UnsupportedError(f"opt_level must be 0-5, got {opt_level}")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"ONNX file not found: {onnx_path}")
    trt = import_trt(flavour)
    trt_logger = _logger(flavour, trt)
    trt_logger.errors.clear()
    is_rtx = flavour == RTX_BACKEND
    log.info("build %s: %s for %s with %s %s", out_path.name, onnx_path, arch, flavour, trt.__version__)
    t0 = time.perf_counter()

    from dtcompile.attention.plugin import register_build_plugins

    # dtc-domain nodes (export.attention: plugin) need their creator registered before parsing
    plugins = tuple(register_build_plugins(trt, flavour, onnx_path))
    # the parser holds the weights the network points at: it lives until the engine is serialized
    builder, network, parser = _parse_network(trt, trt_logger, flavour, onnx_path, strongly_typed)
    inputs = tuple(_tensor_spec(network.get_input(i)) for i in range(network.num_inputs))
    outputs = tuple(_tensor_spec(network.get_output(i)) for i in range(network.num_outputs))
    log.info("build %s: parsed %d layers in %.1f s", out_path.name, network.num_layers, time.perf_counter() - t0)

    config = _builder_config(trt, builder, arch, flavour, refittable, opt_level, weight_streaming)
    config.add_optimization_profile(_optimization_profile(builder, inputs, profile, onnx_path))
    if timing_cache is not None:
        if is_rtx:
            log.warning("build: tensorrt-rtx has no timing cache; ignoring %s", timing_cache)
            timing_cache = None
        else:
            _load_timing_cache(config, Path(timing_cache))

    trt_logger.errors.clear()
    with _interruptible(trt, config, f"build {out_path.stem} {flavour} {arch}") as interrupted:
        serialized = builder.build_serialized_network(network, config)
    if interrupted.is_set():
        raise KeyboardInterrupt(f"{flavour} build of {out_path.name} for {arch} interrupted")
    if serialized is None:
        first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
        raise BuildError(f"{flavour} {trt.__version__} failed to build {onnx_path} for {arch}: {first}")
    if timing_cache is not None:
        write_atomic(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))
    sha = write_atomic(out_path, memoryview(serialized))
    del serialized
    build_s = time.perf_counter() - t0

    info = EngineInfo(
        path=out_path,
        sha256=sha,
        size=out_path.stat().st_size,
        flavour=flavour,
        trt_version=trt.__version__,
        arch=arch,
        build_s=build_s,
        inputs=inputs,
        outputs=outputs,
        profile=profile.to_json(),
        refittable=refittable,
        strongly_typed=strongly_typed,
        opt_level=opt_level,
        plugins=plugins,
        weight_streaming=weight_streaming,
        weights_size=_weights_size(onnx_path) if weight_streaming else None,
    )
    log.info(
        "build %s: %.1f MiB for %s in %.1f s, peak RSS %.0f MiB; wrote %s",
        out_path.name,
        info.size / 2**20,
        arch,
        build_s,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        out_path,
    )
    return info


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors (one optimization profile, dynamic shapes).

    Deserializing needs a CUDA GPU of the arch the engine was built for. Inputs are set with
    ``set_input_shape``/``set_tensor_address`` and the engine is enqueued with ``execute_async_v3`` on the
    current torch CUDA stream, so results are ordered with the surrounding torch work (no extra sync).
    Attributes: ``input_names``, ``output_names``, ``device`` (the current CUDA device), ``engine``, ``context``.
    """

    def __init__(self, engine_path: Path, flavour: str, *, weight_streaming_budget: int | None = None) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise ArtifactError(f"engine file not found: {engine_path}")
        device = gpu_arch()
        if device is None:
            raise ArtifactError(
                f"cannot load {engine_path}: deserializing a {flavour} engine needs a CUDA GPU and none was found"
            )
        import torch

        trt = import_trt(flavour)
        self._trt = trt
        self._torch = torch
        self.path = engine_path
        self.flavour = flavour
        trt_logger = _logger(flavour, trt)
        trt_logger.errors.clear()
        self._runtime = trt.Runtime(trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
            raise ArtifactError(
                f"cannot deserialize {engine_path} with {flavour} {trt.__version__} on this {device} GPU "
                f"(built for another arch or TensorRT version?): {first}"
            )
        if weight_streaming_budget is not None:  # a streamable engine under a device budget (runtime.memory's plan)
            self.engine.weight_streaming_budget_v2 = int(weight_streaming_budget)
            log.info("%s: weight streaming budget %.0f MiB of %.0f MiB streamable", engine_path.name,
                     weight_streaming_budget / 2**20, self.engine.streamable_weights_size / 2**20)  # fmt: skip
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"cannot create an execution context for {engine_path} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.device = torch.device("cuda", torch.cuda.current_device())

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine on ``feed`` (name -> tensor); returns name -> new CUDA tensor.

        Inputs are moved to ``self.device`` and cast to the engine's input types (as the onnxruntime runner
        does: pipelines pass e.g. a float32 guidance to a bf16 graph).
        """
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ArtifactError(f"{self.path}: missing inputs {missing}; the engine takes {self.input_names}")
        keep: list[torch.Tensor] = []  # converted inputs must outlive the enqueue
        for name in self.input_names:
            t = feed[name].detach().to(self.device, self._dtypes[name]).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ArtifactError(
                    f"{self.path}: input '{name}' shape {tuple(t.shape)} is outside the engine's profile "
                    f"(min/opt/max {self.engine.get_tensor_profile_shape(name, 0)})"
                )
            self.context.set_tensor_address(name, t.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = self._torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        # The caching allocator orders reuse of ``keep``'s memory after this stream's work, so the inputs may be
        # released once the engine is enqueued.
        stream = self._torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"{self.path}: execute_async_v3 failed (see the dtcompile.tensorrt log)")
        return outputs


class TensorRTBackend:
    """Datacenter TensorRT: builds only for the GPU it runs on."""

    name: ClassVar[str] = "tensorrt"
    archs: ClassVar[tuple[str, ...]] = TRT_ARCHS["tensorrt"]

    def supports(self, target: Target, settings: BuildSettings) -> str | None:
        """Why ``target`` cannot be built on this machine (None when it can), without building anything."""
        try:
            check_build_target(self.name, target.arch, refittable=settings.refittable)
        except (UnsupportedError, MissingDependencyError) as exc:
            return str(exc)
        return None

    def build(self, job: EngineJob, target: Target, settings: BuildSettings) -> dict[str, Any]:
        """``<artifact>/<backend>/<arch>/<component>.engine`` and its manifest entry (with ``build_s``)."""
        path = job.artifact_dir / self.name / target.arch / f"{job.component}.engine"
        info = engine_from_onnx(
            job.onnx_path,
            job.profile,
            target.arch,
            self.name,
            path,
            refittable=settings.refittable,
            opt_level=settings.opt_level,
            weight_streaming=settings.weight_streaming,
        )
        return {**info.to_manifest(job.artifact_dir), "build_s": round(info.build_s, 2)}

    def open_runner(self, path: Path, entry: dict[str, Any], *, threads: int | None = None) -> TrtRunner:
        """A ``TrtRunner`` (needs a CUDA GPU of the engine's arch; ``threads`` does not apply); the entry's
        ``weight_streaming_budget`` (bytes, from ``runtime.residency``) is set before its context is created."""
        return TrtRunner(path, self.name, weight_streaming_budget=entry.get("weight_streaming_budget"))

    def refit(
        self, engine_path: Path, updates: dict[str, Any], out_path: Path, missing: Callable[[str], Any]
    ) -> dict[str, Any]:
        """See ``refit_engine``."""
        return refit_engine(engine_path, self.name, updates, out_path, missing)


class TensorRTRtxBackend(TensorRTBackend):
    """TensorRT for RTX: builds on any machine, one compute capability per build."""

    name: ClassVar[str] = "tensorrt-rtx"
    archs: ClassVar[tuple[str, ...]] = TRT_ARCHS["tensorrt-rtx"]


def refit_engine(
    engine_path: Path, flavour: str, updates: dict[str, Any], out_path: Path, missing: Callable[[str], Any]
) -> dict[str, Any]:
    """Refit a serialized TensorRT engine with named weights and write it to ``out_path``; {sha256, size}.

    Pushes ``updates`` (ONNX initializer name -> tensor: the parser names TensorRT weights after them), then any
    weight the refitter still asks for (``get_missing_weights``) from ``missing(name)``. Needs a CUDA GPU of the
    engine's arch (deserialization).
    """
    if gpu_arch() is None:
        raise UnsupportedError(f"refitting {engine_path} needs a CUDA GPU (TensorRT deserializes the engine)")
    trt = import_trt(flavour)
    trt_logger = _logger(flavour, trt)
    trt_logger.errors.clear()
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
        raise ArtifactError(f"cannot deserialize {engine_path} for refit: {first}")
    refit_weights(engine, flavour, updates, missing, str(engine_path))
    sha = write_atomic(out_path, memoryview(engine.serialize()))
    return {"sha256": sha, "size": Path(out_path).stat().st_size}


def refit_weights(
    engine: Any, flavour: str, updates: dict[str, Any], missing: Callable[[str], Any], label: str
) -> None:
    """Refit a deserialized engine in place (``trt.Refitter``): push ``updates`` (ONNX initializer name ->
    tensor), then any weight the refitter still asks for from ``missing(name)``. ``refit_engine`` uses it on a
    file, a live server on the engine it runs (between runs; its execution contexts stay valid)."""
    import torch

    trt = import_trt(flavour)
    trt_logger = _logger(flavour, trt)
    trt_logger.errors.clear()
    if not engine.refittable:
        raise UnsupportedError(
            f"{label} was built without REFIT; rebuild with engine.refittable: true (needs a GPU at build)"
        )
    refitter = trt.Refitter(engine, trt_logger)
    folded = sorted(set(updates) - set(refitter.get_all_weights()))
    if folded:
        raise UnsupportedError(
            f"{label}: TensorRT folded weight '{folded[0]}' into another layer, so it cannot be refit "
            f"({len(folded)} such); fuse the LoRA with dtc build instead"
        )
    dtypes = {
        torch.float32: trt.float32,
        torch.float16: trt.float16,
        torch.bfloat16: trt.bfloat16,
        torch.int8: trt.int8,
        torch.float8_e4m3fn: trt.fp8,
    }
    keep: list[torch.Tensor] = []  # pushed weights must outlive refit_cuda_engine

    def push(name: str, value: torch.Tensor) -> None:
        t = value.detach().contiguous().cpu()
        keep.append(t)
        if t.dtype not in dtypes:
            raise UnsupportedError(f"refit: TensorRT weight '{name}' has dtype {t.dtype}")
        if not refitter.set_named_weights(name, trt.Weights(dtypes[t.dtype], t.data_ptr(), t.numel())):
            first = trt_logger.errors[-1] if trt_logger.errors else "size or dtype differs from the engine's"
            raise BuildError(f"refit: TensorRT rejected new weights for '{name}' in {label}: {first}")

    for name, value in updates.items():
        push(name, value)
    for name in refitter.get_missing_weights():
        push(name, missing(name))
    if not refitter.refit_cuda_engine():
        first = trt_logger.errors[0] if trt_logger.errors else "no error reported"
        raise BuildError(f"refit of {label} failed: {first}")


# --- helpers ------------------------------------------------------------------------------------------------

# TensorRT uses the first logger a process registers for every later builder and runtime, so each flavour
# gets one long-lived logger; it forwards to Python logging and remembers errors for the exception messages.
_LOGGERS: dict[str, Any] = {}


def _logger(flavour: str, trt: Any) -> Any:
    if flavour not in _LOGGERS:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(msg)
                    log.error("%s: %s", flavour, msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("%s: %s", flavour, msg)
                elif severity == trt.ILogger.Severity.INFO:
                    log.debug("%s: %s", flavour, msg)

        _LOGGERS[flavour] = _Logger()
    return _LOGGERS[flavour]


def _parser_error(err: Any) -> str:
    where = f" at node {err.node()} '{err.node_name()}' ({err.node_operator()})" if err.node() >= 0 else ""
    return f"{err.desc()}{where}"


def _io_json(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "dims": list(t.dims)}


def _tensor_spec(t: Any) -> TensorSpec:
    return TensorSpec(t.name, FROM_TRT.get(t.dtype.name, t.dtype.name.lower()), tuple(int(d) for d in t.shape))


def _optimization_profile(builder: Any, inputs: tuple[TensorSpec, ...], profile: ShapeProfile, onnx_path: Path) -> Any:
    """One optimization profile; every dynamic input must be in ``profile`` with shapes matching its rank."""
    names = {t.name for t in inputs}
    unknown = sorted(set(profile.min) - names)
    if unknown:
        raise BuildError(
            f"shape profile names {unknown}, which are not inputs of {onnx_path} (inputs: {sorted(names)})"
        )
    opt_profile = builder.create_optimization_profile()
    for t in inputs:
        if t.name not in profile.min:
            if any(isinstance(d, int) and d < 0 for d in t.dims):  # TensorRT's dims: -1 where dynamic
                raise BuildError(
                    f"shape profile has no min/opt/max for dynamic input '{t.name}' {t.dims} of {onnx_path}"
                )
            continue
        shapes = [tuple(getattr(profile, k)[t.name]) for k in ("min", "opt", "max")]
        for shape in shapes:
            fixed = (isinstance(d, int) and d >= 0 and d != s for d, s in zip(t.dims, shape, strict=True))
            if len(shape) != len(t.dims) or any(fixed):
                raise BuildError(f"shape profile {shapes} for input '{t.name}' does not fit its dims {t.dims}")
        if not all(a <= b <= c for a, b, c in zip(*shapes, strict=True)):
            raise BuildError(f"shape profile for input '{t.name}' is not min <= opt <= max: {shapes}")
        opt_profile.set_shape(t.name, *shapes)
    return opt_profile


def _load_timing_cache(config: Any, path: Path) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        raise ArtifactError(
            f"timing cache {path} was made by another TensorRT version or device; delete it to start a new one"
        )


def _torch_dtype(torch: Any, trt_dtype: Any) -> Any:
    name = FROM_TRT.get(trt_dtype.name)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise ArtifactError(f"engine tensor type {trt_dtype.name} has no torch equivalent")
    return dtype


def _weights_size(onnx_path: Path) -> int:
    """Bytes of the graph's initializers (their shapes and types; the data is not read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        for d in t.dims:
            n *= d
        total += n
    return total


__all__ = [
    "EngineInfo",
    "TensorRTBackend",
    "TensorRTRtxBackend",
    "TrtRunner",
    "check_build_target",
    "engine_from_onnx",
    "import_trt",
    "refit_engine",
]
