"""Per-request LoRA on a live session (``dtc serve --lora-dir``): adapters checked against a served artifact's
weight map once, then swapped into its loaded denoiser by recomputing the touched weights from the base.

Input: a loaded runtime ``Session`` and adapter files by name. Output: ``LiveLoras``, whose ``activate(choice)``
makes the session's denoiser hold exactly the weights ``dtc refit`` writes for that adapter set (the same plan,
``tools.refit.plan_refit``, over the build's weight map and base store), or the artifact's own weights for the
empty set. Nothing is stacked: every swap starts from the base, so A -> B -> A gives A and A -> none gives the
artifact back.

- onnxruntime: a new ``InferenceSession`` over the same graph file with the touched initializers replaced
  (``SessionOptions.add_initializer``); the empty set opens the graph as it is, so a request without LoRA runs on
  the artifact's own bytes. The old session is dropped once the new one is open (a failed swap leaves it).
- TensorRT: the live engine is refit in place (``backends.tensorrt.refit_weights``, ``trt.Refitter``), every
  initializer any offered adapter touches pushed (the loaded values for those the current set leaves alone).
  Needs the engine built refittable and its GPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import DtcError
from dtcompile.core.targets import REFERENCE_BACKEND, gpu_arch
from dtcompile.weights.onnx_weights import OnnxWeights
from dtcompile.weights.weight_map import load_base_store

if TYPE_CHECKING:
    from dtcompile.runtime.session import Session
    from dtcompile.stages.lora import LoraWeights

log = logging.getLogger("dtcompile.serve")

#: An adapter set as a request names it: (adapter name, scale) pairs in a canonical order; () is the base.
Choice = tuple[tuple[str, float], ...]


def live_lora_blocker(session: Session) -> str | None:
    """Why the loaded ``session`` cannot take per-request LoRA (None: it can): no LoRA-refittable weights (no
    weight map, a block-cached build), several denoisers, CFG-parallel ranks, or an engine that cannot be refit
    here."""
    from dtcompile.tools.refit import engine_blocker, refit_components

    if session.parallel is not None:
        return "it is served CFG-parallel (--parallel), whose follower ranks would keep the base weights"
    manifest = session.manifest.to_json()
    try:
        comps = refit_components(session.artifact_dir, manifest)
    except DtcError as exc:
        return str(exc)
    if len(comps) > 1:
        return f"it has {len(comps)} denoisers ({', '.join(comps)}) and per-request LoRA swaps one"
    if not manifest["components"][comps[0]].get("weight_map"):
        return (
            "it was built without a weight map, so it has no LoRA-refittable weights (a build stopped before "
            "export or an older dtc); rebuild it with dtc build"
        )
    entry = session.entry
    if entry is not None and entry.backend != REFERENCE_BACKEND:
        return engine_blocker(entry.to_json(), gpu_arch())
    return None


def lora_files(folder: Path) -> dict[str, Path]:
    """The ``.safetensors`` files directly in ``folder`` by name (the file's stem); DtcError when ``folder`` is
    not a readable directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DtcError(f"--lora-dir {folder}: not a directory; pass a folder of LoRA .safetensors files")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" and p.is_file()}


class LiveLoras:
    """One loaded session's adapters (those that fit its weight map; the others in ``refused`` with the
    reason) and the adapter set its denoiser holds now (``loaded``)."""

    def __init__(self, session: Session, files: dict[str, Path]) -> None:
        from dtcompile.stages.lora import resolve_lora
        from dtcompile.tools.refit import artifact_data, lora_state, read_adapters, read_weight_map, refit_components

        self.session = session
        artifact_dir = session.artifact_dir
        manifest = session.manifest.to_json()
        self.comp = comp = refit_components(artifact_dir, manifest)[0]
        self._centry = centry = manifest["components"][comp]
        self._wmap = read_weight_map(artifact_dir, centry, comp)
        self._graph = OnnxWeights(artifact_dir / centry["onnx"]["file"])
        state = lora_state(manifest.get("lora") or {}, comp, comp)
        with artifact_data(centry, comp):
            self._store = load_base_store(artifact_dir, state)
        self.adapters: dict[str, LoraWeights] = {}
        self.refused: dict[str, str] = {}
        for name, path in sorted(files.items()):
            try:
                resolved = resolve_lora(str(path), None, 1.0, f"{path.name}")
                with artifact_data(centry, comp):
                    (self.adapters[name],) = read_adapters([resolved], self._wmap, session.pipeline_class, comp, comp)
            except DtcError as exc:
                self.refused[name] = str(exc)
        built = set(state.get("touched", []))
        self._ever = sorted(built.union(*(w.params() for w in self.adapters.values())))
        self._as_loaded: dict[str, Any] | None = None
        self.loaded: Choice = ()

    def updates(self, choice: Choice) -> dict[str, Any]:
        """Initializer name -> value for ``choice`` (refit's plan from the base; every initializer any offered
        adapter touches, base values where ``choice`` leaves it alone). DtcError for an unknown name or a
        result that overflows the engine's dtype."""
        from dtcompile.tools.refit import artifact_data, plan_refit

        unknown = [n for n, _ in choice if n not in self.adapters]
        if unknown:
            raise DtcError(f"no adapter named {unknown[0]!r} for {self.session.name}")
        with artifact_data(self._centry, self.comp):
            plan = plan_refit(self._wmap, self._graph, self._store, self._ever,
                              [(self.adapters[n], s) for n, s in choice])  # fmt: skip
        self._store = plan.base_store  # base values first read from the graph are kept: read once
        return plan.updates

    def activate(self, choice: Choice) -> float | None:
        """Make the denoiser hold ``choice``'s weights; the seconds the swap took, None when already loaded.
        On an error (DtcError) the denoiser keeps what it had."""
        if choice == self.loaded:
            return None
        t0 = time.perf_counter()
        session, entry = self.session, self.session.entry
        module = session.module
        if entry is None or module is None:
            raise DtcError(f"{session.name}: the model is not loaded")
        if entry.backend == REFERENCE_BACKEND:
            from dtcompile.backends.onnxruntime import OrtRunner

            overrides = self.updates(choice) if choice else {}
            module.runner = OrtRunner(session.artifact_dir / entry.file, threads=session.threads,
                                      initializers=overrides)  # fmt: skip
        else:
            from dtcompile.backends.tensorrt import refit_weights

            runner = module.runner
            new = self.updates(choice) if choice else self._loaded_values()
            refit_weights(
                runner.engine, runner.flavour, new, self._graph.tensor, str(session.artifact_dir / entry.file)
            )
        self.loaded = choice
        seconds = time.perf_counter() - t0
        log.info("%s: LoRA %s loaded in %.3f s", session.name, describe(choice), seconds)
        return seconds

    def _loaded_values(self) -> dict[str, Any]:
        """The artifact's own values of every initializer a swap writes (what a TensorRT engine gets back for a
        request without LoRA)."""
        if self._as_loaded is None:
            self._as_loaded = {name: self._graph.tensor(name) for name in self.updates(())}
        return self._as_loaded


def describe(choice: Choice) -> str:
    """``style:0.8+ink:1`` (``none`` for the base)."""
    return "+".join(f"{n}:{s:g}" for n, s in choice) or "none"
