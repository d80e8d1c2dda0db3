"""The build plan: a Recipe in, a ``Plan`` out, computed once and before any weights load.

The plan resolves the model source (and its family adapter), every (backend, arch) target with the reason it
cannot be built here, the attention mode the export emits, and the quant, cache and LoRA checks. ``dtc build
--dry-run`` prints it; ``run_build`` executes the same object, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.backends import get_backend
from dtcompile.backends.base import BuildSettings, Target
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.targets import REFERENCE_BACKEND, TRT_ARCHS

if TYPE_CHECKING:
    from dtcompile.attention.modes import AttentionChoice
    from dtcompile.models.base import ModelAdapter
    from dtcompile.recipe import Recipe
    from dtcompile.recipe.cache import CacheSpec
    from dtcompile.recipe.quant import QuantSpec
    from dtcompile.recipe.schema import ComponentSpec
    from dtcompile.stages.load import ResolvedSource
    from dtcompile.stages.lora import ResolvedLora


@dataclass(frozen=True)
class PlannedTarget:
    """One engine the recipe asks for, and why it will not be built here (None: it will)."""

    backend: str
    arch: str
    reason: str | None = None

    @property
    def target(self) -> Target:
        return Target(self.backend, self.arch)

    def skipped(self) -> dict[str, str]:
        """The manifest's ``skipped`` record of a target that is not built."""
        return {"backend": self.backend, "arch": self.arch, "reason": self.reason or ""}


@dataclass
class Plan:
    """What a build will do: the source, per-target status, attention mode, output folder and notes."""

    recipe: Recipe
    source: ResolvedSource
    out_dir: Path
    base_dir: Path | None  # the recipe's folder: relative paths in it resolve there
    recipe_path: str | None
    targets: list[PlannedTarget] = field(default_factory=list)
    attention: AttentionChoice | None = None
    loras: tuple[ResolvedLora, ...] = ()  # the recipe's adapters: local files hashed, hub ids not yet fetched
    notes: list[str] = field(default_factory=list)  # extra dry-run lines (cache segments, LoRA files)

    @property
    def settings(self) -> BuildSettings:
        return BuildSettings(refittable=self.recipe.engine.refittable, opt_level=self.recipe.engine.opt_level)

    def settings_for(self, component: str) -> BuildSettings:
        """``settings`` with the component's own ``weight_streaming`` (``components[i]``, else ``engine``'s)."""
        spec = next((c for c in self.recipe.components if c.name == component), None)
        own = spec.weight_streaming if spec is not None else None
        streaming = self.recipe.engine.weight_streaming if own is None else own
        return dataclasses.replace(self.settings, weight_streaming=streaming)

    def buildable(self, *, engines_only: bool = False) -> list[PlannedTarget]:
        """Targets that will be built (``engines_only``: without the onnxruntime reference)."""
        return [t for t in self.targets if t.reason is None and not (engines_only and t.backend == REFERENCE_BACKEND)]

    def blocked(self) -> list[PlannedTarget]:
        return [t for t in self.targets if t.reason is not None]

    def lines(self) -> list[str]:
        """The dry-run report."""
        from dtcompile.stages import STAGE_NAMES

        r = self.recipe
        out = [
            f"recipe {r.name}: {r.model.source} ({self.source.kind}), dtype {r.dtype}, opset {r.export.opset}",
            f"stages: {' -> '.join(STAGE_NAMES)}; output {self.out_dir}",
        ]
        for t in self.targets:
            status = "build" if t.reason is None else f"will NOT build: {t.reason}"
            out.append(f"  {t.backend:<13} {t.arch:<7} {status}")
        return out + self.notes


def make_plan(recipe: Recipe, recipe_path: str | Path | None = None) -> Plan:
    """Dry run: validate source, backends, dtype, arches, quant, cache, LoRA files and attention; load nothing."""
    from dtcompile.attention.modes import resolve_attention
    from dtcompile.stages.load import resolve_source

    base_dir = Path(recipe_path).resolve().parent if recipe_path else None
    plan = Plan(
        recipe=recipe,
        source=resolve_source(recipe.model),
        out_dir=Path(recipe.output.dir) / recipe.name,
        base_dir=base_dir,
        recipe_path=str(recipe_path) if recipe_path is not None else None,
    )
    _check_output_dir(plan.out_dir)
    adapter = plan.source.adapter
    if adapter is not None:  # shape rules of the family, from config files only
        if recipe.export.shapes.frames is not None and not adapter.video:
            raise RecipeError(f"export.shapes.frames: {adapter.pipeline_class} makes images, not videos; remove frames")
        adapter.check_shapes(recipe.export.shapes, lambda comp: component_config(plan.source, comp))
        denoisers = plan.source.denoisers
        if denoisers is not None:  # several denoisers (Wan2.2's experts): LoRA components, whole calibration runs
            from dtcompile.stages.load import check_denoisers

            check_denoisers(recipe, denoisers)
    plan.targets = _plan_targets(recipe, plan.settings)
    if recipe.components and adapter is not None:
        aux = aux_components(recipe, adapter)
        _check_tiles(plan, aux)
        plan.notes.append(
            "components: "
            + ", ".join([adapter.component, *(f"{c.name} ({_precision(c, recipe)})" for c in aux)])
            + " as engines"
        )
    if recipe.quant is not None:
        _plan_quant(plan, recipe.quant)
    if recipe.quantized_components():
        _plan_component_quant(plan)
    if recipe.cache is not None:
        plan.notes += _plan_cache(plan, recipe.cache)
    if recipe.lora:  # local LoRA files must exist and be safetensors (hub ids are fetched at build)
        from dtcompile.stages.lora import resolve_loras

        plan.loras = loras = tuple(resolve_loras(recipe.lora, download=False, base_dir=plan.base_dir))
        for r in loras:
            plan.notes.append(f"lora: {r.path if r.sha256 else r.source} (scale {r.scale:g})")
        plan.notes += _plan_lora_targets(plan, [r for r in loras if r.sha256])
    # export.attention over the buildable targets: an explicit mode a target cannot take raises here
    plan.attention = resolve_attention(recipe, [(t.backend, t.arch) for t in plan.buildable()])
    plan.notes.append(plan.attention.line())
    return plan


def _plan_targets(recipe: Recipe, settings: BuildSettings) -> list[PlannedTarget]:
    """The onnxruntime reference (if asked) and every (TensorRT backend, arch) pair, in recipe order."""
    backends = recipe.engine.backends
    out: list[PlannedTarget] = []
    if REFERENCE_BACKEND in backends:
        reason = get_backend(REFERENCE_BACKEND).supports(Target(REFERENCE_BACKEND, "any"), settings)
        if reason is not None:
            raise RecipeError(f"engine.backends: {reason}")
        if recipe.dtype == "bfloat16":
            raise UnsupportedError(
                "engine.backends: onnxruntime has no CPU kernels for bfloat16 graphs; "
                "set dtype: float32 or float16, or drop onnxruntime from engine.backends"
            )
        out.append(PlannedTarget(REFERENCE_BACKEND, "any"))
    for backend in backends:
        if backend not in TRT_ARCHS:
            continue
        impl = get_backend(backend)
        for arch in recipe.engine.targets:
            if arch in TRT_ARCHS[backend]:
                out.append(PlannedTarget(backend, arch, impl.supports(Target(backend, arch), settings)))
    return out


#: Kernel pseudo-filesystems: an artifact written there is lost or, worse, written into kernel settings.
PSEUDO_FILESYSTEMS = ("/proc", "/sys")


def _check_output_dir(out_dir: Path) -> None:
    """``output.dir/name`` must be a folder that can be created: no file on the way, not under a kernel
    pseudo-filesystem (``/proc``, ``/sys``), and, if it exists, an artifact folder or empty."""
    from dtcompile.core.files import check_replaceable

    resolved = out_dir.resolve()
    for root in PSEUDO_FILESYSTEMS:
        if resolved == Path(root) or Path(root) in resolved.parents:
            raise RecipeError(
                f"output.dir: {out_dir} is under {root}, a kernel pseudo-filesystem, not a disk; choose a folder "
                "on a disk (e.g. output.dir: engines)"
            )
    check_replaceable(out_dir, "output.dir")
    for path in (out_dir, *out_dir.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise RecipeError(f"output.dir: {path} is a file, not a folder; choose another output.dir or name")
            return


def _plan_quant(plan: Plan, spec: QuantSpec) -> None:
    """Quant rules before any weights load: format x backend x arch, SVDQuant rank vs width, no cache mix;
    ``spec`` is the recipe's ``quant``."""
    from dtcompile.quant import check_targets, get_format

    recipe = plan.recipe
    if recipe.cache is not None:
        raise UnsupportedError(
            "quant and cache: block-cache artifacts are exported unquantized; drop one of the two sections"
        )
    check_targets(spec, [(t.backend, t.arch) for t in plan.targets if t.backend != REFERENCE_BACKEND])
    fmt = get_format(spec.format)
    plan.targets = [
        PlannedTarget(t.backend, t.arch, fmt.supports(REFERENCE_BACKEND))
        if t.backend == REFERENCE_BACKEND and t.reason is None
        else t
        for t in plan.targets
    ]
    from dtcompile.quant.calibration import load_prompts

    load_prompts(spec.calib, plan.base_dir)  # a missing or empty prompts file fails here, not after loading
    adapter = plan.source.adapter
    config = component_config(plan.source, adapter.component) if adapter is not None else None
    width = adapter.hidden_width(config) if adapter is not None and config else 0
    problem = fmt.check_width(spec, width) if width else None
    if problem:
        raise UnsupportedError(problem)


def _precision(spec: ComponentSpec, recipe: Recipe) -> str:
    dtype = spec.dtype or recipe.dtype
    return dtype if spec.quant is None else f"{spec.quant}, {dtype} compute"


def _check_tiles(plan: Plan, aux: list[ComponentSpec]) -> None:
    """A tiled VAE decoder's tile, from the VAE's config before any weights load: a size diffusers' tiled decode
    can make (``core.tiles.check_tile``; the export checks it again with the pipeline's own scale factor)."""
    from dtcompile.core.tiles import check_tile

    for spec in aux:
        if spec.tile is None:
            continue
        blocks = (component_config(plan.source, "vae") or {}).get("block_out_channels")
        if isinstance(blocks, list) and blocks:
            check_tile(spec.tile, 2 ** (len(blocks) - 1), "components: vae_decoder tile")
        plan.notes.append(f"vae_decoder: built for {spec.tile} px tiles, larger images decode tile by tile")


def aux_components(recipe: Recipe, adapter: ModelAdapter) -> list[ComponentSpec]:
    """The recipe's ``components`` besides the denoiser, checked against the family (RecipeError naming the
    item): each one the family has, and the denoiser listed (in the recipe's dtype, quantized by ``quant``)
    when the list is not empty; a component's ``quant`` must be a format its kind is built in
    (UnsupportedError naming ``components[i].quant`` and the choices)."""
    specs = recipe.components
    if not specs:
        return []
    names = [c.name for c in specs]
    choices = ", ".join([adapter.component, *adapter.aux_components])
    for i, c in enumerate(specs):
        if c.name != adapter.component and c.name not in adapter.aux_components:
            raise RecipeError(
                f"components[{i}]: {adapter.pipeline_class} has no engine component '{c.name}'; choose from: {choices}"
            )
        if c.name == adapter.component and c.dtype not in (None, recipe.dtype):
            raise RecipeError(
                f"components[{i}].dtype: the denoiser '{c.name}' is built in the recipe's dtype ({recipe.dtype}); "
                "set dtype instead"
            )
        if c.dtype == "bfloat16" and REFERENCE_BACKEND in recipe.engine.backends:
            raise UnsupportedError(
                f"components[{i}].dtype: onnxruntime has no CPU kernels for bfloat16 graphs; set dtype: float32 "
                "or float16, or drop onnxruntime from engine.backends"
            )
        if c.quant is not None:
            _check_component_quant(i, c, adapter)
    if adapter.component not in names:
        raise RecipeError(
            f"components: the list must include the denoiser '{adapter.component}' (it has {', '.join(names)})"
        )
    return [c for c in specs if c.name != adapter.component]


def _check_component_quant(i: int, spec: ComponentSpec, adapter: ModelAdapter) -> None:
    """One line naming ``components[i].quant``, the component and the formats it takes, for a pair not built."""
    from dtcompile.models.components import COMPONENT_KINDS

    field = f"components[{i}].quant"
    if spec.name == adapter.component:
        raise RecipeError(
            f"{field}: the denoiser '{spec.name}' is quantized by the recipe's quant section; remove quant from "
            f"components[{i}] and set quant.format: {spec.quant}"
        )
    kind = COMPONENT_KINDS[adapter.aux_components[spec.name]]
    if spec.quant in kind.quant_formats:
        return
    if not kind.quant_formats:
        takers = [
            f"{n} takes {', '.join(COMPONENT_KINDS[k].quant_formats)}"
            for n, k in adapter.aux_components.items()
            if COMPONENT_KINDS[k].quant_formats
        ]
        raise UnsupportedError(
            f"{field}: {spec.name} is {kind.description}, which takes no quant format ({kind.no_quant}); "
            f"remove quant from components[{i}]" + (f" ({'; '.join(takers)})" if takers else "")
        )
    raise UnsupportedError(
        f"{field}: {spec.name} is {kind.description}, which dtcompile does not build in {spec.quant}; "
        f"choose one of: {', '.join(kind.quant_formats)}"
    )


def _plan_component_quant(plan: Plan) -> None:
    """Dry-run rules of every ``components[i].quant``: format x backend x arch (one line naming the field)
    and the calibration prompts (the ``quant:`` section's, else the schema's defaults) readable."""
    from dtcompile.quant import check_targets
    from dtcompile.quant.calibration import load_prompts

    recipe = plan.recipe
    for i, spec in enumerate(recipe.components):
        if spec.quant is None:
            continue
        check_targets(
            spec.quant,
            [(t.backend, t.arch) for t in plan.targets if t.backend != REFERENCE_BACKEND],
            field=f"components[{i}].quant",
            fix=f"remove quant from components[{i}]",
        )
    calib, acc = recipe.calibration()
    prompts = load_prompts(calib, plan.base_dir)
    names = ", ".join(c.name for c in recipe.quantized_components())
    plan.notes.append(
        f"quantized components: {names}, calibrated on {len(prompts)} prompts "
        f"({calib.prompts if isinstance(calib.prompts, str) else 'inline list'}), {acc.prompts} held out"
    )


def component_config(resolved: ResolvedSource, component: str) -> dict[str, Any] | None:
    """A component's config.json without loading weights (None: a hub model not downloaded yet)."""
    if (name := resolved.builtin_name) is not None:  # a builtin source
        from dtcompile.models.builtin import builtin

        config = builtin(name).config.get(component)
        if isinstance(config, dict):
            return dict(config)
    from dtcompile.stages.load import cached_hub_file, source_dir

    if resolved.kind == "hub":
        cached = cached_hub_file(resolved.spec, f"{component}/config.json")
        return json.loads(cached.read_text()) if cached is not None else None

    path = source_dir(resolved) / component / "config.json"
    if not path.is_file():
        raise RecipeError(f"model.source: {path} not found; the pipeline has no {component} component")
    return json.loads(path.read_text())


def component_weight_shapes(resolved: ResolvedSource, component: str) -> dict[str, tuple[int, ...]] | None:
    """Every weight's shape from the component's safetensors headers, no tensor read (None: not local)."""
    if resolved.kind == "hub":
        return None
    from dtcompile.stages.load import source_dir
    from dtcompile.stages.lora import check_safetensors

    files = sorted((source_dir(resolved) / component).glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        header = check_safetensors(path, f"model.source ({component})")
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if isinstance(v, dict) and "shape" in v})
    return shapes or None


def _plan_lora_targets(plan: Plan, local: list[Any]) -> list[str]:
    """Local LoRA files against the component's weight shapes (RecipeError for a LoRA of another model)."""
    from dtcompile.stages.lora import check_lora_fits, read_lora

    adapter = plan.source.adapter
    if not local or adapter is None:
        return []
    shapes = component_weight_shapes(plan.source, adapter.component)
    if shapes is None:
        return ["lora: modules are matched to the model's weights once it downloads (not cached locally)"]
    for r in local:
        check_lora_fits(
            read_lora(r, adapter.pipeline_class, adapter.component), shapes, f"the model's {adapter.component}"
        )
    return [f"lora: every module of {len(local)} adapter(s) matches a {adapter.component} weight"]


def _plan_cache(plan: Plan, spec: CacheSpec) -> list[str]:
    """Dry-run check of ``spec`` (the recipe's ``cache``) against the model's block names (no weights loaded);
    plan lines."""
    from dtcompile.recipe.cache import plan_lines, plan_segments

    adapter, denoisers = plan.source.adapter, plan.source.denoisers
    later = [f"cache {spec.mode}: block patterns are checked after the model downloads (not cached locally)"]
    if adapter is None or denoisers is None:
        return later
    adapter.cache_layout(spec.mode)  # refuses a family the mode has no layout or signal for
    segments = {}
    for name in denoisers:  # each denoiser is split on its own (Wan2.2: both experts)
        config = component_config(plan.source, name)
        if config is None:
            return later
        segments[name] = plan_segments(spec, adapter.block_names(config))
    return plan_lines(spec, segments)
