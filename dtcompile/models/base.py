"""The contract of a model-family adapter (``ModelAdapter``); the graph types it speaks live in core.graph.

Everything family-specific is behind this contract: which components become engines, their graph I/O and
shape profile, how to call the pipeline (``call_kwargs``) and read what it returns (``output_media``), how a
transformer splits into block engines for caching (``cache_layout``), its quantization exclusions and the
upstream export patches it needs. Stages, the runtime and the tools talk to the adapter, never to a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dtcompile.core.graph import ExportSpec, ShapeProfile, Shapes, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

    from dtcompile.models.components import AuxGraph


@dataclass(frozen=True)
class GenerationRequest:
    """One pipeline call in family-neutral terms; the adapter turns it into the pipeline's keyword arguments.

    ``prompt`` is one prompt or a batch; ``guidance``, ``text_len`` and ``negative_prompt`` are left to the
    pipeline's defaults when None; ``output_type`` is diffusers' ("pil", "pt", "np" or "latent"); ``callback`` is diffusers'
    ``callback_on_step_end``.
    """

    prompt: str | list[str]
    steps: int
    height: int
    width: int
    generator: Any = None
    guidance: float | None = None
    text_len: int | None = None
    images_per_prompt: int = 1
    output_type: str = "pil"
    callback: Any = None
    negative_prompt: str | list[str] | None = None
    image: Any = None  # the reference image (PIL) of an editing family (``ModelAdapter.reference_image``)
    frames: int | None = None  # video families: pixel frames (None: the pipeline's default)


class CacheLayout(Protocol):
    """How a family's transformer splits into ``prologue -> blocks* -> epilogue`` parts (docs/cache.md).

    ``streams`` are the tensors every block updates (a block part returns ``<stream>_out`` for each),
    ``shared`` the tensors the prologue computes once per call and every block reads; the epilogue reads
    ``epilogue_inputs`` (a subset of both) and returns the component's output.
    """

    streams: tuple[str, ...]
    shared: tuple[str, ...]
    carried: tuple[str, ...]  # prologue outputs only the epilogue reads (SD3's latent grid size)
    epilogue_inputs: tuple[str, ...]

    def prologue(self, module: torch.nn.Module) -> torch.nn.Module:
        """The forward up to the first block: graph inputs in, ``streams + shared + carried`` out (in that order)."""

    def blocks(self, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        """A run of consecutive blocks: ``streams + shared`` in, ``<stream>_out`` out."""

    def epilogue(self, module: torch.nn.Module) -> torch.nn.Module:
        """The forward after the last block: ``epilogue_inputs`` in, the component's output out."""

    def intermediate_specs(self, module: torch.nn.Module, mono: ExportSpec, dtype: str) -> dict[str, TensorSpec]:
        """Tensor specs of every stream and shared tensor, with the monolithic graph's symbolic dims."""

    def intermediate_shapes(
        self, module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every stream and shared tensor for one set of monolithic input shapes."""


class SplitLayout:
    """Base of the families' ``CacheLayout``s: ``prologue``, ``blocks`` and ``epilogue`` wrap modules in the
    family's three part classes, which ``part_classes()`` returns (built on first use: they need torch)."""

    @staticmethod
    def part_classes() -> tuple[type, type, type]:
        raise NotImplementedError

    def prologue(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.part_classes()[0](module)

    def blocks(self, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        return self.part_classes()[1](blocks)

    def epilogue(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.part_classes()[2](module)


def attention_dims(config: Any) -> tuple[int, int]:
    """(heads x head dim, head dim) of a transformer config with ``num_attention_heads`` and
    ``attention_head_dim``."""
    head = int(config["attention_head_dim"])
    return int(config["num_attention_heads"]) * head, head


class ExampleSampler:
    """Seeded example inputs for an export at the opt shapes ``opt`` (name -> shape): one CPU generator (seed 0)
    drawn in call order, each tensor moved to ``module``'s device in ``dtype``."""

    def __init__(self, opt: dict[str, tuple[int, ...]], module: torch.nn.Module, dtype: torch.dtype) -> None:
        import torch

        self._torch, self.opt, self.dtype = torch, opt, dtype
        self.device = next(module.parameters()).device
        self._gen = torch.Generator().manual_seed(0)

    def randn(self, name: str) -> torch.Tensor:
        """Standard normal values shaped like input ``name``."""
        t = self._torch.randn(self.opt[name], generator=self._gen)
        return t.to(device=self.device, dtype=self.dtype)

    def rand(self, name: str, scale: float = 1.0) -> torch.Tensor:
        """Uniform values in [0, ``scale``) shaped like input ``name`` (timesteps)."""
        t = self._torch.rand(self.opt[name], generator=self._gen)
        return (t if scale == 1.0 else t * scale).to(device=self.device, dtype=self.dtype)


class _ComponentView:
    """An adapter whose ``component`` is another denoiser of the same pipeline; everything else delegates."""

    def __init__(self, adapter: Any, component: str) -> None:
        self._adapter = adapter
        self.component = component

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def component_view(adapter: Any, component: str | None) -> Any:
    """``adapter`` itself, or a view of it whose ``component`` is ``component`` (e.g. Wan2.2's ``transformer_2``),
    so code written for ``adapter.component`` (calibration, accuracy, parity) runs on that denoiser."""
    if component is None or component == adapter.component:
        return adapter
    return _ComponentView(adapter, component)


class ModelAdapter(Protocol):
    """One model family (FLUX, SD3, ...): what to load, export and how to shape and call it."""

    family: str
    pipeline_class: str  # diffusers class name, e.g. "FluxPipeline"
    component: str  # the component turned into an engine, e.g. "transformer"
    negative_prompt: bool  # whether the pipeline uses a negative prompt (classifier-free guidance)
    reference_image: bool  # whether a call edits a reference image (``GenerationRequest.image``)
    video: bool  # whether the pipeline makes videos (``export.shapes.frames``, ``GenerationRequest.frames``)
    default_exclude: tuple[str, ...]  # module-name patterns never quantized
    # other components that can become engines (recipe ``components``) -> their kind (``clip``, ``t5``, ``vae``:
    # ``dtcompile.models.components.COMPONENT_KINDS``, which says what each can be quantized to)
    aux_components: Mapping[str, str]

    def denoisers(self, model_index: dict[str, Any]) -> tuple[str, ...]:
        """The components that become denoiser engines, ``component`` first (Wan2.2: both experts), from the
        pipeline's model_index.json."""

    def pipe_config(self, pipe: Any) -> dict[str, Any]:
        """The pipeline facts the other methods need (their ``pipe_config``), read from a loaded pipeline."""

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        """I/O specs and example inputs (at the opt shapes) for exporting ``module``."""

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A wrapper taking the graph inputs positionally and returning the single output tensor."""

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        """The engine graph of component ``name`` (one of ``aux_components``: a text encoder or the VAE
        decoder, ``dtcompile.models.components``) with the family's facts filled in."""

    def shape_profile(self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes) -> ShapeProfile:
        """Concrete min/opt/max shapes of every graph input for the recipe's shape ranges."""

    def hidden_width(self, config: dict[str, Any]) -> int:
        """The component's hidden width from its config (0 when unknown); quant formats check alignment on it."""

    def export_patches(self) -> tuple[str, ...]:
        """Names of the upstream patches (``dtcompile.export.patches.PATCHES``) the export needs."""

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline's keyword arguments for ``request``."""

    def output_media(self, output: Any) -> list[Any]:
        """The generated images (or videos) of a pipeline call's return value, one per output."""

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Refuse recipe shapes (``Recipe.export.shapes``) the family cannot take, naming the field.

        ``config(component)`` is that component's config.json (None when not at hand, e.g. a hub model not
        downloaded yet); nothing is loaded. Raises RecipeError.
        """

    def check_image_size(self, height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Refuse a generation size the family cannot make exactly (UnsupportedError naming height or width).

        ``config`` as for ``check_shapes``; the runtime and the server call this before the pipeline runs.
        """

    def block_names(self, config: dict[str, Any]) -> list[str]:
        """Block names of the component, in execution order (UnsupportedError when it cannot be split)."""

    def cache_layout(self) -> CacheLayout:
        """How the component splits into block engines (UnsupportedError when it cannot)."""
