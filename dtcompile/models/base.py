"""The contract of a model-family adapter (``ModelAdapter``); the graph types it speaks live in core.graph.

Everything family-specific is behind this contract: which components become engines, their graph I/O and
shape profile, how to call the pipeline (``call_kwargs``) and read what it returns (``output_media``), how a
transformer splits into block engines for caching (``cache_layout``), its quantization exclusions and the
upstream export patches it needs. Stages, the runtime and the tools talk to the adapter, never to a family.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, ShapeProfile, Shapes, TensorSpec

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
    last_image: Any = None  # image-to-video: the last frame's image (PIL), where the pipeline takes one


@dataclass(frozen=True)
class UlyssesLayout:
    """What Ulysses sequence parallel exchanges in one denoiser call (``runtime/ulysses.py`` predicts the bytes
    from it): ``tokens`` in every all-to-all attention (split over the ranks), ``attention_calls`` of them per
    call, each over ``width`` channels (heads x head dim, ``heads`` heads, split over the ranks between the two
    all-to-alls); the output's ``out_tokens`` x ``out_width`` values are gathered once at the end."""

    tokens: int
    attention_calls: int
    width: int
    heads: int
    out_tokens: int
    out_width: int


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
    teacache_signal: str | None  # the prologue output TeaCache measures (None: no TeaCache for the family)

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
    family's three part classes, which ``part_classes()`` returns (built on first use: they need torch); the
    intermediate tensors' specs and shapes both come from the family's ``tensor_dims``."""

    float32_tensors: tuple[str, ...] = ("rope_cos", "rope_sin")  # kept in float32 whatever the build dtype
    carried: tuple[str, ...] = ()
    #: The prologue output TeaCache measures (None: the family has no TeaCache signal yet).
    teacache_signal: str | None = None
    #: Prologue outputs made only for TeaCache (FLUX: the first block's modulated input; Wan's ``temb`` is
    #: carried anyway).
    signal_outputs: tuple[str, ...] = ()

    def __init__(self, signal: bool = False) -> None:
        """``signal``: the prologue also returns ``signal_outputs`` (a TeaCache split)."""
        self.signal = signal
        if signal:
            self.carried = (*type(self).carried, *(s for s in self.signal_outputs if s not in type(self).carried))

    @staticmethod
    def part_classes() -> tuple[type, type, type]:
        raise NotImplementedError

    def signal_prologue_class(self) -> type:
        """The prologue class of a TeaCache split (the plain one where the signal is an output anyway)."""
        return self.part_classes()[0]

    def tensor_dims(
        self, module: torch.nn.Module, dims: dict[str, tuple[int | str, ...]], symbolic: bool
    ) -> dict[str, tuple[int | str, ...]]:
        """Dims of every stream, shared and carried tensor from the monolithic graph inputs' ``dims``: the
        graph's symbolic dims (``symbolic``: names for the sizes the split introduces) or one call's shapes."""
        raise NotImplementedError

    def intermediate_specs(self, module: torch.nn.Module, mono: ExportSpec, dtype: str) -> dict[str, TensorSpec]:
        dims = self.tensor_dims(module, {t.name: t.dims for t in mono.inputs}, symbolic=True)
        return {n: TensorSpec(n, "float32" if n in self.float32_tensors else dtype, d) for n, d in dims.items()}

    def intermediate_shapes(
        self, module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        # not symbolic: every dim is a size
        return cast("dict[str, tuple[int, ...]]", self.tensor_dims(module, dict(shapes), symbolic=False))

    def prologue(self, module: torch.nn.Module) -> torch.nn.Module:
        return (self.signal_prologue_class() if self.signal else self.part_classes()[0])(module)

    def blocks(self, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        return self.part_classes()[1](blocks)

    def epilogue(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.part_classes()[2](module)


def check_size_multiple(height: int, width: int, multiple: int, why: str) -> None:
    """UnsupportedError naming height or width unless both are positive multiples of ``multiple``; ``why`` says
    where the multiple comes from, and the message offers the nearest sizes that work."""
    for what, size in (("height", height), ("width", width)):
        if size <= 0 or size % multiple:
            lower = max(multiple, size // multiple * multiple)
            raise UnsupportedError(
                f"image {what} {size} is not a positive multiple of {multiple} ({why}); use e.g. {lower} or "
                f"{lower + multiple}"
            )


def check_one_size(shapes: Any, family: str, why: str) -> None:
    """RecipeError unless ``export.shapes`` gives height and width one value each (min = opt = max): engines of
    ``family`` take one image size, ``why`` says what fixes it in the trace."""
    for var in ("height", "width"):
        r = getattr(shapes, var)
        if not r.min == r.opt == r.max:
            raise RecipeError(
                f"export.shapes.{var}: {family} engines are built for one size ({why}); set min = opt = max = {r.opt}"
            )


def attention_dims(config: Any) -> tuple[int, int]:
    """(heads x head dim, head dim) of a transformer config with ``num_attention_heads`` and
    ``attention_head_dim``."""
    head = int(config["attention_head_dim"])
    return int(config["num_attention_heads"]) * head, head


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
    guidance_branches: str | None  # how the pipeline runs its guidance branches: "batched", "sequential" or None
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

    def unread_params(self, config: dict[str, Any]) -> tuple[str, ...]:
        """fnmatch patterns of the component's parameters the exported graph never reads (for ``config``)."""

    def engine_call(self, kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
        """The keyword call the pipeline makes on its denoiser turned into the graph's inputs by name (``config``:
        the denoiser's config), for arguments the graph takes in another form (Qwen-Image's ``img_shapes``)."""

    def adapt_call(self, arguments: dict[str, Any], given: set[str]) -> None:
        """Adapt a user's pipeline call (its bound ``arguments``, sizes already checked) to the engines, in
        place, for what ``given`` (the arguments the user set) leaves to the pipeline's defaults."""

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Refuse recipe shapes (``Recipe.export.shapes``) the family cannot take, naming the field.

        ``config(component)`` is that component's config.json (None when not at hand, e.g. a hub model not
        downloaded yet); nothing is loaded. Raises RecipeError.
        """

    def check_image_size(self, height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Refuse a generation size the family cannot make exactly (UnsupportedError naming height or width).

        ``config`` as for ``check_shapes``; the runtime and the server call this before the pipeline runs.
        """

    def check_frames(self, frames: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Refuse a frame count a video family cannot make exactly (UnsupportedError); called for video
        families only (``video``), after the artifact's frame range is checked."""

    def block_names(self, config: dict[str, Any]) -> list[str]:
        """Block names of the component, in execution order (UnsupportedError when it cannot be split)."""

    def cache_layout(self, mode: str | None = None) -> CacheLayout:
        """How the component splits into block engines for cache ``mode`` (UnsupportedError when it cannot)."""

    def teacache_coefficients(self, config: dict[str, Any]) -> tuple[list[float], str]:
        """TeaCache's rescaling polynomial (numpy.poly1d order) for a transformer config, and its source."""

    ulysses: bool  # whether the family has a sequence-parallel form (``runtime/ulysses.py``)

    def ulysses_module(self, transformer: torch.nn.Module, comm: Any) -> torch.nn.Module:
        """``transformer`` as one rank of a Ulysses group (``AdapterBase.ulysses_module``)."""

    def ulysses_layout(
        self, config: dict[str, Any], pipe_config: Callable[[str], dict[str, Any] | None], height: int, width: int,
        frames: int | None, text_len: int,
    ) -> UlyssesLayout:  # fmt: skip
        """What one denoiser call of a request exchanges under Ulysses (``AdapterBase.ulysses_layout``)."""


@functools.cache
def _positional_forward_class() -> type:
    """The nn.Module class of ``AdapterBase.export_module`` (built on first use: needs torch)."""
    import torch

    class DenoiserForExport(torch.nn.Module):
        """Takes the graph inputs positionally (``names`` order; trailing optional ones may be left out) and
        returns the denoiser's output tensor."""

        def __init__(self, transformer: torch.nn.Module, names: tuple[str, ...]) -> None:
            super().__init__()
            self.transformer = transformer
            self.names = names

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            if len(inputs) > len(self.names):
                raise TypeError(f"the graph takes at most {len(self.names)} inputs, got {len(inputs)}")
            return self.transformer(**dict(zip(self.names, inputs, strict=False)), return_dict=False)[0]

    return DenoiserForExport


class AdapterBase:
    """What the families' adapters share; each family sets the class attributes and implements ``shapes_at``.

    ``graph_inputs`` are the denoiser's graph inputs in order; ``block_lists`` its block lists in execution
    order as (module list, config key of its length);
    ``cache_layout_class`` the ``CacheLayout`` of that split (None: not split); ``per_prompt_key`` the pipeline's
    outputs-per-prompt argument.
    """

    pipeline_class: ClassVar[str]
    component: ClassVar[str] = "transformer"
    negative_prompt: ClassVar[bool] = False
    reference_image: ClassVar[bool] = False
    video: ClassVar[bool] = False
    graph_inputs: ClassVar[tuple[str, ...]]
    block_lists: ClassVar[tuple[tuple[str, str], ...]] = ()
    cache_layout_class: ClassVar[type | None] = None
    per_prompt_key: ClassVar[str] = "num_images_per_prompt"
    prompt_embeds_extra_tokens: ClassVar[int] = 0  # text tokens of ``prompt_embeds`` beyond the T5 length (SD3)
    #: How the pipeline runs classifier-free guidance: "batched" (one call on [uncond, cond]), "sequential" (a
    #: "cond" then an "uncond" call) or None (guidance-distilled: no branches); ``runtime/parallel.py`` splits them.
    guidance_branches: ClassVar[str | None] = None
    no_cache_reason: ClassVar[str] = ""  # " (why)" where cache_layout_class is None

    def denoisers(self, model_index: dict[str, Any]) -> tuple[str, ...]:
        """The denoiser engine components: ``component`` alone, unless the family says otherwise."""
        return (self.component,)

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every graph input with ``pick`` choosing each range's min, opt or max."""
        raise NotImplementedError

    #: Ulysses sequence parallel (``runtime/ulysses.py``): the family implements ``ulysses_module`` and
    #: ``ulysses_layout``.
    ulysses: ClassVar[bool] = False

    def ulysses_module(self, transformer: torch.nn.Module, comm: Any) -> torch.nn.Module:
        """``transformer`` as one rank of a Ulysses group: a module taking the pipeline's keyword call that holds
        this rank's slice of the sequence and runs attention through ``comm`` (``runtime.ulysses.SequenceGroup``:
        ``shard``, ``attention``, ``gather``); returns the whole output. Families without it refuse."""
        raise UnsupportedError(f"--parallel ulysses: {self.pipeline_class} has no sequence-parallel form yet")

    def ulysses_layout(
        self, config: dict[str, Any], pipe_config: Callable[[str], dict[str, Any] | None], height: int, width: int,
        frames: int | None, text_len: int,
    ) -> UlyssesLayout:  # fmt: skip
        """The sequence and widths one denoiser call of a ``height`` x ``width`` (x ``frames``) request exchanges."""
        raise UnsupportedError(f"--parallel ulysses: {self.pipeline_class} has no sequence-parallel form yet")

    def shape_profile(self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes) -> ShapeProfile:
        """Concrete min/opt/max shapes of every graph input for the recipe's shape ranges."""
        return ShapeProfile.over_ranges(lambda pick: self.shapes_at(module, pipe_config, shapes, pick))

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A wrapper taking ``graph_inputs`` positionally and returning the single output tensor."""
        return _positional_forward_class()(module, self.graph_inputs)

    @staticmethod
    def hidden_width(config: dict[str, Any]) -> int:
        """The transformer's hidden width (heads x head dim) from its config; 0 when the config lacks them."""
        return int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))

    def check_size_ranges(self, shapes: Shapes, config: Callable[[str], dict[str, Any] | None]) -> None:
        """``check_image_size`` on the min, opt and max of the recipe's height and width ranges, as RecipeError
        naming the field (``export.shapes.height.max: ...``)."""
        for var in ("height", "width"):
            for which in ("min", "opt", "max"):
                size = getattr(getattr(shapes, var), which)
                try:
                    self.check_image_size(size, size, config)
                except UnsupportedError as exc:
                    raise RecipeError(
                        f"export.shapes.{var}.{which}: {str(exc).removeprefix('image height ')}"
                    ) from None

    def check_image_size(self, height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        raise NotImplementedError

    def check_frames(self, frames: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        raise NotImplementedError  # video families only (``video``)

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline's keyword arguments; options left None keep the pipeline's defaults."""
        kwargs: dict[str, Any] = {
            "prompt": request.prompt,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "generator": request.generator,
            self.per_prompt_key: request.images_per_prompt,
            "output_type": request.output_type,
        }
        optional = {
            "guidance_scale": request.guidance,
            "max_sequence_length": request.text_len,
            "callback_on_step_end": request.callback,
            "negative_prompt": request.negative_prompt if self.negative_prompt else None,
            "num_frames": request.frames if self.video else None,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def output_media(self, output: Any) -> list[Any]:
        """The pipeline output's images, or videos (``frames``) for a video family."""
        return list(output.frames if self.video else output.images)

    def unread_params(self, config: dict[str, Any]) -> tuple[str, ...]:
        """None: every parameter of the component reaches its output. A family whose graph drops some (their
        output is never read, e.g. a last block's text stream) names them: the weight map records them as
        ``unread`` and ``dtc refit`` skips a LoRA's deltas on them (they change nothing), where it would refuse
        an unmapped parameter."""
        return ()

    def engine_call(self, kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
        """The pipeline's keyword call as it is: the graph inputs are the denoiser's own arguments."""
        return kwargs

    def adapt_call(self, arguments: dict[str, Any], given: set[str]) -> None:
        """Nothing to adapt beyond what the runtime session does for every family."""

    def block_names(self, config: dict[str, Any]) -> list[str]:
        """``<list>.<i>`` for every block of ``block_lists``, in execution order."""
        self.cache_layout()  # refuses a family that is not split
        missing = [key for _, key in self.block_lists if key not in config]
        if missing:
            raise UnsupportedError(
                f"cache: the {self.pipeline_class} {self.component} config has no {', '.join(missing)}; it cannot be "
                "split into block engines; remove the cache section"
            )
        return [f"{name}.{i}" for name, key in self.block_lists for i in range(int(config[key]))]

    def cache_layout(self, mode: str | None = None) -> CacheLayout:
        """How the component splits into block engines for cache ``mode`` (UnsupportedError for a family that is
        not split, or that has no TeaCache signal for mode teacache)."""
        if self.cache_layout_class is None:
            raise UnsupportedError(
                f"cache: {self.pipeline_class} artifacts are not split into block engines yet{self.no_cache_reason}; "
                "remove the cache section"
            )
        if mode == "teacache" and getattr(self.cache_layout_class, "teacache_signal", None) is None:
            raise UnsupportedError(
                f"cache.mode: teacache has no signal for {self.pipeline_class} yet (TeaCache measures FLUX's first "
                "block's modulated input and Wan's timestep embedding); use mode first_block or static"
            )
        return self.cache_layout_class(signal=mode == "teacache")

    def teacache_coefficients(self, config: dict[str, Any]) -> tuple[list[float], str]:
        """TeaCache's rescaling polynomial for this transformer config and where it comes from; the identity
        (the raw change, no rescaling) where none is published: ``dtc cache fit`` fits one."""
        return [1.0, 0.0], "identity (none published for this family): fit them with dtc cache fit"
