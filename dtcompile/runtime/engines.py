"""Engine selection: which of an artifact's engines runs a component on this machine.

Shared by the plain runtime (``dtcompile.runtime.run``) and the block-cache runtime (``dtcompile.runtime.cache``),
which opens every part of a split denoiser on the backend chosen here for its prologue.
"""

from __future__ import annotations

from dtcompile.core.errors import ArtifactError
from dtcompile.core.targets import REFERENCE_BACKEND, TRT_EXTRAS, TRT_MODULES, installed_trt_major
from dtcompile.manifest import EngineEntry, Manifest


def select_engine(manifest: Manifest, component: str, backend: str, gpu: str | None) -> EngineEntry:
    """The manifest entry to run for ``backend`` on a machine whose GPU arch is ``gpu`` (None: no GPU)."""
    if manifest.stopped_after:
        raise ArtifactError(f"artifact stopped after stage '{manifest.stopped_after}'; it has no engines to run")
    engines = manifest.component(component).engines
    if backend == "auto":
        if gpu is not None:
            for flavour in TRT_MODULES:  # datacenter TensorRT first
                if installed_trt_major(flavour) and any(e.backend == flavour and e.arch == gpu for e in engines):
                    return select_engine(manifest, component, flavour, gpu)
        backend = "onnxruntime"
    candidates = [e for e in engines if e.backend == backend]
    built = ", ".join(sorted({e.target for e in engines})) or "none"
    if not candidates:
        raise ArtifactError(
            f"artifact has no {backend} engine (it has: {built}); rebuild with {backend} in engine.backends"
        )
    if backend == REFERENCE_BACKEND:
        return candidates[0]
    archs = ", ".join(e.arch for e in candidates)
    if gpu is None:
        raise ArtifactError(
            f"{backend} engines ({archs}) need an NVIDIA GPU to run and this machine has none; "
            "use --backend onnxruntime"
        )
    match = [e for e in candidates if e.arch == gpu]
    if not match:
        raise ArtifactError(
            f"no {backend} engine for this GPU ({gpu}); the artifact has {archs}: add {gpu} to engine.targets and rebuild"
        )
    entry = match[0]
    installed = installed_trt_major(backend)
    built_major = int(str(entry.trt_version or "0").split(".")[0])
    if installed is None:
        raise ArtifactError(f"{backend} is not installed (pip install 'dtcompile[{TRT_EXTRAS[backend]}]')")
    if installed != built_major:
        raise ArtifactError(
            f"{entry.file} was built with {backend} {entry.trt_version}, this machine has major "
            f"version {installed}; engines only load in the major version that built them: rebuild"
        )
    return entry
