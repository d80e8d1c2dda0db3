"""Residency: which engine components stay loaded while a pipeline runs (``--residency all|sequential``).

``all`` (the default without a memory budget) opens every component's engine when the session loads and keeps it.
``sequential`` opens a component when it is first called and releases every other component at that moment, so
only the component that runs is resident: the text encoders encode (each released when the next one runs), the
denoiser loads and runs the loop, then the VAE decoder loads and decodes; the next generation starts over. A
release drops the runner: an onnxruntime session is freed with it (session lifetime); a TensorRT runner's
execution context and deserialized engine are destroyed, and the next load deserializes the engine file again.

Each load and release is timed, logged (``residency: load transformer in 1.23s``) and kept as a ``Swap``
for the generation's report (``Generation.swaps``, ``dtc bench``'s ``swap_s``).

Input: the component's name and a function that opens its runner. Output: a runner (the opened one for ``all``,
a ``ResidentRunner`` that opens on demand for ``sequential``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dtcompile.core.errors import UnsupportedError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("dtcompile.run")

#: The ``--residency`` choices.
RESIDENCIES = ("all", "sequential")
#: Swaps kept until ``take_swaps`` (a generation's are a handful).
MAX_KEPT = 1024


def check_residency(value: str, flag: str = "--residency") -> str:
    """``value`` when it is one of ``RESIDENCIES``, else UnsupportedError naming ``flag``."""
    if value not in RESIDENCIES:
        raise UnsupportedError(f"{flag} {value!r}: choose one of: {', '.join(RESIDENCIES)}")
    return value


@dataclass(frozen=True)
class Swap:
    """One load or release of a component's engine and the seconds it took."""

    component: str
    action: Literal["load", "release"]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "action": self.action, "seconds": round(self.seconds, 4)}


class ResidentRunner:
    """A component's runner that ``Residency`` opens on the component's first call and may release between calls.

    ``device``: where the runner's outputs live (known before it opens: the stand-ins read it at construction).
    """

    def __init__(self, owner: Residency, name: str, opener: Callable[[], Any], device: Any) -> None:
        self.owner, self.name, self.opener, self.device = owner, name, opener, device
        self.runner: Any = None

    @property
    def loaded(self) -> bool:
        return self.runner is not None

    def load(self) -> Any:
        if self.runner is None:
            t0 = time.perf_counter()
            self.runner = self.opener()
            self.owner.record(self.name, "load", time.perf_counter() - t0)
        return self.runner

    def release(self) -> None:
        if self.runner is None:
            return
        t0 = time.perf_counter()
        self.runner = None  # the only reference: the session (or TensorRT context and engine) is freed now
        if str(self.device) != "cpu":  # hand torch's cached blocks (its outputs) back for the next engine's own
            import torch

            torch.cuda.empty_cache()
        self.owner.record(self.name, "release", time.perf_counter() - t0)

    def prepare(self) -> Any:
        """Make this component the resident one (release the others, load it): before it runs."""
        self.owner.activate(self.name)
        return self.load()

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self.prepare()(feeds)


class Residency:
    """The residency policy of one session and its record of swaps (see the module docstring)."""

    def __init__(self, policy: str = "all", budgets: dict[str, int] | None = None) -> None:
        self.policy = check_residency(policy)
        self.budgets = dict(budgets or {})  # component -> weight-streaming budget in bytes (runtime/memory.py)
        self.runners: dict[str, ResidentRunner] = {}
        self.swaps: list[Swap] = []

    def runner(self, name: str, opener: Callable[[], Any], device: Any) -> Any:
        """Component ``name``'s runner: opened now for ``all``, on its first call for ``sequential``."""
        if self.policy == "all":
            return opener()
        resident = ResidentRunner(self, name, opener, device)
        self.runners[name] = resident
        return resident

    def engine_record(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        """The manifest entry the backend opens ``name``'s engine with: its weight-streaming budget added where the
        memory plan gave it one (``TrtRunner`` sets ``weight_streaming_budget_v2`` from it)."""
        budget = self.budgets.get(name)
        return entry if budget is None else {**entry, "weight_streaming_budget": int(budget)}

    def attach(self, modules: Any) -> None:
        """Load each stand-in's engine in a forward pre-hook registered now, before any timing hook, so that a
        step's time (``dtc bench``'s step timer) does not include the swap."""
        for module in modules:
            runner = getattr(module, "runner", None)
            if isinstance(runner, ResidentRunner):
                module.register_forward_pre_hook(lambda *_, r=runner: r.prepare() and None)

    def activate(self, name: str) -> None:
        """``name`` is about to run: release every other loaded component."""
        for other, resident in self.runners.items():
            if other != name and resident.loaded:
                resident.release()

    def release_all(self) -> None:
        """Release every loaded component (the next call loads its own again)."""
        for resident in self.runners.values():
            resident.release()

    def record(self, name: str, action: Literal["load", "release"], seconds: float) -> None:
        self.swaps.append(Swap(name, action, seconds))
        if len(self.swaps) > MAX_KEPT:  # a server calling the pipeline itself never takes them: keep the latest
            del self.swaps[: len(self.swaps) - MAX_KEPT]
        log.info("residency: %s %s in %.3fs", action, name, seconds)

    def take_swaps(self) -> list[Swap]:
        """The swaps since the last call (one generation's), emptying the record."""
        swaps, self.swaps = self.swaps, []
        return swaps

    def resident(self) -> list[str]:
        """The components loaded now (``all``: every component handed a runner)."""
        return [n for n, r in self.runners.items() if r.loaded]


def backend_device(backend: str) -> str:
    """Where a backend's runner puts its outputs: the CPU for onnxruntime, the current CUDA device for TensorRT."""
    return "cpu" if backend == "onnxruntime" else "cuda"


def swap_summary(swaps: list[Swap]) -> dict[str, Any]:
    """Loads, releases and their total seconds per component (for ``dtc bench`` and the run's last line)."""
    out: dict[str, Any] = {}
    for s in swaps:
        row = out.setdefault(s.component, {"loads": 0, "releases": 0, "load_s": 0.0, "release_s": 0.0})
        row["loads" if s.action == "load" else "releases"] += 1
        row[f"{s.action}_s"] = round(row[f"{s.action}_s"] + s.seconds, 4)
    return out


def swap_line(policy: str, swaps: list[Swap]) -> str:
    """One line for ``dtc run``: the residency and each component's load/release seconds."""
    parts = [f"{name} load {row['load_s']:.2f}s release {row['release_s']:.2f}s"
             for name, row in swap_summary(swaps).items()]  # fmt: skip
    return f"residency {policy}: " + ", ".join(parts)
