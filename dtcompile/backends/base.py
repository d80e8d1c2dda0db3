"""The backend contract: what every engine backend (onnxruntime, tensorrt, tensorrt-rtx) implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from dtcompile.core.graph import ShapeProfile


@dataclass(frozen=True)
class Target:
    """One engine to build: a backend and an arch ("any" for the onnxruntime reference)."""

    backend: str
    arch: str


@dataclass(frozen=True)
class BuildSettings:
    """Engine-invariant build settings from the recipe's ``engine`` section."""

    refittable: bool = False
    opt_level: int = 3
    weight_streaming: bool = False  # TensorRT: BuilderFlag.WEIGHT_STREAMING (docs/memory.md)


@dataclass(frozen=True)
class EngineJob:
    """What one engine is built from: the component's ONNX graph, its shape profile and where it goes.

    Engines land in ``artifact_dir`` (``<backend>/<arch>/<component>.engine`` for TensorRT) and manifest
    paths are relative to it.
    """

    onnx_path: Path
    profile: ShapeProfile
    artifact_dir: Path
    component: str


class Backend(Protocol):
    """An engine backend, registered by name in ``dtcompile.backends.BACKENDS``.

    ``supports`` is cheap (no weights, no build) and runs at dry-run time; ``build`` writes one engine for one
    target and returns its manifest entry; ``open_runner`` loads an engine entry for running (a callable mapping
    name -> tensor feeds to outputs); ``refit`` writes a refit copy of an engine (``missing`` supplies weights
    the engine asks for that ``updates`` does not hold).
    """

    name: ClassVar[str]
    #: Arches the backend builds for; ``("any",)`` for a backend whose artifact runs anywhere.
    archs: ClassVar[tuple[str, ...]]

    def supports(self, target: Target, settings: BuildSettings) -> str | None:
        """None when ``target`` can be built here with ``settings``, else one line naming why and the fix."""

    def build(self, job: EngineJob, target: Target, settings: BuildSettings) -> dict[str, Any]:
        """Build ``job``'s engine for ``target`` into ``job.artifact_dir``; its manifest engine entry."""

    def open_runner(
        self, path: Path, entry: dict[str, Any], *, threads: int | None = None
    ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """A runner for the engine file ``path`` described by manifest ``entry``; ``threads``: CPU threads of a
        CPU backend (None: its default; GPU backends ignore it)."""

    def refit(
        self,
        engine_path: Path,
        updates: dict[str, Any],
        out_path: Path,
        missing: Callable[[str], Any],
    ) -> dict[str, Any]:
        """Write ``engine_path`` with ``updates`` applied to ``out_path``; returns {sha256, size}."""
