"""dtcompile's public Python API; the ``dtc`` command line is a thin layer over these functions.

```python
import dtcompile.api as dtc

report = dtc.build("recipes/tiny-flux.yaml")                 # -> BuildReport (artifact folder, manifest)
pipe = dtc.load_pipeline(report.artifact_dir)                # -> the diffusers pipeline, engines standing in
image = pipe("a red fox in the snow", num_inference_steps=4).images[0]
```

Importing this module loads no torch, diffusers or TensorRT; each function imports what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtcompile.recipe import Recipe
    from dtcompile.stages.plan import Plan
    from dtcompile.stages.runner import BuildReport
    from dtcompile.tools.refit import RefitReport


def plan(recipe: str | Path | Recipe, overrides: Sequence[str] = ()) -> Plan:
    """The dry run: everything checkable before weights load (raises a DtcError naming the problem)."""
    from dtcompile.stages.plan import make_plan

    loaded, path = _recipe(recipe, overrides)
    return make_plan(loaded, path)


def build(
    recipe: str | Path | Recipe,
    overrides: Sequence[str] = (),
    *,
    stop_after: str | None = None,
    force: bool = False,
) -> BuildReport:
    """Build an artifact from a recipe file (or a loaded ``Recipe``); ``overrides`` are ``a.b=value`` strings."""
    from dtcompile.stages.runner import run_build

    return run_build(plan(recipe, overrides), stop_after=stop_after, force=force)


def load_pipeline(
    artifact: str | Path,
    backend: str = "auto",
    *,
    verify: bool | str = True,
    cache: bool | None = None,
    parallel: str | None = None,
    residency: str | None = None,
    device_memory: str | int | None = None,
) -> Any:
    """The artifact's diffusers pipeline with its engines standing in for their components.

    ``backend``: "auto" (TensorRT on a matching GPU, else onnxruntime), "onnxruntime", "tensorrt-rtx" or
    "tensorrt". Use it as the pipeline ``from_pretrained`` would return (``pipe(prompt, ...)``): it is an
    instance of the artifact's diffusers pipeline class, and every call is checked against the built profile
    first (``dtcompile.runtime.session.Session.prepare_call``): defaults the artifact cannot take become the
    built ones (said once in the log), values outside it raise UnsupportedError naming the argument.
    ``parallel="cfg=2"``: this process is one of two ranks started by ``torchrun --nproc-per-node 2``, each
    running the same script; each computes one guidance branch; ``"ulysses=N"`` (N ranks) splits each denoiser
    call's tokens, ``"cfg=2,ulysses=N"`` both (2N ranks; docs/parallel.md).
    ``residency="sequential"``: only the component that runs has its engine loaded; ``device_memory="16GiB"``:
    a device budget that picks the residency and streamable engines' budgets (docs/memory.md).
    """
    from dtcompile.runtime.session import Session

    spec = None
    if parallel is not None:
        from dtcompile.runtime.parallel import ParallelSpec

        spec = ParallelSpec.parse(parallel, flag="parallel=")
    session = Session(artifact, backend, verify=verify, cache=cache, parallel=spec, residency=residency,
                      device_memory=device_memory)  # fmt: skip
    return session.load()


def refit(
    artifact: str | Path,
    loras: Sequence[tuple[str, float] | tuple[str, float, str | None]],
    *,
    out: str | Path | None = None,
    in_place: bool = False,
    drop_unrefittable: bool = False,
) -> RefitReport:
    """Swap LoRA weights into a built artifact: ``loras`` is ``[(path, scale), ...]`` (or ``(path, scale,
    denoiser)`` for another denoiser than the main one, e.g. Wan2.2's ``transformer_2``); ``[]`` restores the
    base."""
    from dtcompile.tools.refit import refit_artifact

    return refit_artifact(
        Path(artifact),
        list(loras),
        out_dir=Path(out) if out is not None else None,
        in_place=in_place,
        drop_unrefittable=drop_unrefittable,
    )


def _recipe(recipe: str | Path | Recipe, overrides: Sequence[str]) -> tuple[Recipe, str | None]:
    from dtcompile.recipe import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        if overrides:
            from dtcompile.core.errors import RecipeError

            raise RecipeError("overrides apply to a recipe file; pass the file's path, or a Recipe without overrides")
        return recipe, None
    return load_recipe(recipe, tuple(overrides)), str(recipe)


__all__ = ["build", "load_pipeline", "plan", "refit"]
