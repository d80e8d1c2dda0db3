"""NVIDIA Cosmos-Predict2: the ``transformer`` (CosmosTransformer3DModel) of ``Cosmos2TextToImagePipeline`` and
``Cosmos2VideoToWorldPipeline``.

Graph (Text2Image): ``hidden_states`` (batch x 16 x 1 latent frame x h x w; the pipeline scales the latents by
``c_in`` of the EDM preconditioning), ``timestep`` (batch; ``sigma / (sigma + 1)`` in 0..1), ``encoder_hidden_states``
(T5's hidden states, batch x text_len x text_dim) and, where the checkpoint sets ``concat_padding_mask`` (the real
ones do; the tiny built-ins do not), ``padding_mask`` (1 x 1 x height x width in pixels, zeros: the pipelines never
pad; the transformer resizes it to the latent grid and concatenates it as a channel; an unread one is dropped by
the stand-in, ``fixed_inputs``); output ``latent`` (the denoiser output, shaped like ``hidden_states``; the pipeline applies
``c_skip``/``c_out`` and guidance in torch).

Video2World adds ``condition_mask`` (batch x 1 x latent_frames x h x w: 1 on the conditioning frames, concatenated
to the latents) and per-frame timesteps (``timestep`` is batch x 1 x latent_frames x 1 x 1: the conditioning frames
at ``sigma_conditioning``); ``fps`` (the RoPE's temporal scale) is a Python number the pipeline passes per call: it
is fixed at export (``COSMOS_FPS``, the pipeline's default 16) and a different ``fps`` is refused by the runtime
rather than silently ignored. The conditioning image (``dtc run --image``; a conditioning video is not wired yet)
goes through ``vae.encode`` (the ``vae_encoder``
component, as for Wan I2V; the VAE is the same ``AutoencoderKLWan``).

Classifier-free guidance is two calls per step (conditional, then unconditional), so the engine's batch is the
prompt batch. The VAE decoder and T5 stay in torch. The pipelines refuse to run without a safety checker and
default to Cosmos Guardrail; see ``dtcompile/models/builtins/cosmos.py`` for what the built-ins do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.dtypes import dtype_name
from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.core.graph import ExportSpec, Range, Shapes, TensorSpec
from dtcompile.models.base import AdapterBase, GenerationRequest, check_size_multiple
from dtcompile.models.examples import ExampleSampler, model_config

if TYPE_CHECKING:
    import torch

    from dtcompile.models.components import AuxGraph

MAX_SEQUENCE_LENGTH = 512  # the Cosmos2 pipelines' default T5 length (padded to it)
COSMOS_FPS = 16  # Cosmos2VideoToWorldPipeline's default fps, baked into the exported RoPE


def _factors(config: Callable[[str], dict[str, Any] | None]) -> tuple[int, int, int]:
    """(temporal, spatial, spatial x patch) factors from the saved vae and transformer configs."""
    down = (config("vae") or {}).get("temperal_downsample", [False, True, True])
    patch = int(((config("transformer") or {}).get("patch_size") or [1, 2, 2])[1])
    return 2 ** sum(down), 2 ** len(down), 2 ** len(down) * patch


@functools.cache
def safety_checker_class() -> type:
    """``PassThroughSafetyChecker`` (built on first use: needs torch and diffusers). It lives in the adapter module,
    which dtc imports before any ``from_pretrained``: diffusers loads a custom component only from a module that is
    already imported."""
    import torch
    from diffusers import ConfigMixin, ModelMixin

    class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
        """Cosmos' safety-checker interface with no checks: every prompt passes, every video comes back as is.
        Only for the random-weight built-ins (their outputs are noise); real checkpoints run Cosmos Guardrail."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("unused", torch.zeros(1))  # a weights file for save/from_pretrained

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames: Any) -> Any:
            return frames

    PassThroughSafetyChecker.__module__ = __name__
    PassThroughSafetyChecker.__qualname__ = "PassThroughSafetyChecker"
    return PassThroughSafetyChecker


def __getattr__(name: str) -> Any:
    """Lazy attributes (no torch at import): ``PassThroughSafetyChecker``, and ``ModelMixin``, which diffusers'
    loader looks up in a custom component's module (``model_index.json``: ``["dtcompile.models.cosmos",
    "PassThroughSafetyChecker"]``) to pick its load method."""
    if name == "PassThroughSafetyChecker":
        return safety_checker_class()
    if name == "ModelMixin":
        from diffusers import ModelMixin

        return ModelMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Cosmos2T2IAdapter(AdapterBase):
    """Cosmos-Predict2 Text2Image (``Cosmos2TextToImagePipeline``): one frame through the video transformer."""

    family = "cosmos2-t2i"
    pipeline_class = "Cosmos2TextToImagePipeline"
    negative_prompt = True
    guidance_branches = "sequential"  # a "cond" call, then an "uncond" call
    graph_inputs: ClassVar[tuple[str, ...]] = ("hidden_states", "timestep", "encoder_hidden_states", "padding_mask")
    aux_components: ClassVar[dict[str, str]] = {}
    no_cache_reason = " (Cosmos' blocks are not split into cache parts yet)"
    # NVIDIA's examples keep the embedders, the output head and the norms in high precision.
    default_exclude = (
        "*patch_embed*", "*time_embed*", "*learnable_pos_embed*", "*crossattn_proj*", "*norm_out*", "*proj_out*",
    )  # fmt: skip

    @staticmethod
    def pipe_config(pipe: Any) -> dict[str, Any]:
        """The VAE's factors."""
        return {"temporal": int(pipe.vae_scale_factor_temporal), "spatial": int(pipe.vae_scale_factor_spatial)}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        raise UnsupportedError(f"components: {self.pipeline_class} has no engine component {name!r}")

    def _latent_frames(self, shapes: Shapes, pick: Callable[[Range], int], temporal: int) -> int:
        return 1

    @staticmethod
    def _padding(cfg: Any) -> bool:
        """Whether the transformer reads ``padding_mask`` (``concat_padding_mask``); else the export drops it."""
        return bool(cfg.get("concat_padding_mask", True))

    def inputs_of(self, cfg: Any) -> tuple[str, ...]:
        """The graph inputs for transformer config ``cfg``: ``graph_inputs`` less ``padding_mask`` where unread."""
        return tuple(n for n in self.graph_inputs if n != "padding_mask" or self._padding(cfg))

    def fixed_inputs(self, config: dict[str, Any]) -> dict[str, Any]:
        """What the pipeline passes that the engine does not take (``ComponentStandIn.fixed_inputs``): an unread
        ``padding_mask``."""
        return {} if self._padding(config) else {"padding_mask": None}

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Graph inputs positionally (``inputs_of``) and the constant keyword arguments (``_constants``)."""
        return _cosmos_forward_class()(module, self.inputs_of(model_config(module)), self._constants())

    def _constants(self) -> dict[str, Any]:
        return {}

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        batch, h, w = (pick(r) for r in (shapes.batch, shapes.height, shapes.width))
        s = pipe_config["spatial"]
        frames = self._latent_frames(shapes, pick, pipe_config["temporal"])
        cfg = model_config(module)
        return {
            "hidden_states": (batch, self._noise_channels(cfg), frames, h // s, w // s),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, pick(shapes.text_len), int(cfg["text_embed_dim"])),
            **({"padding_mask": (1, 1, h, w)} if self._padding(cfg) else {}),
        }

    @staticmethod
    def _noise_channels(cfg: Any) -> int:
        return int(cfg["in_channels"])

    def _specs(self, module: torch.nn.Module, shapes: Shapes, dt: str) -> list[TensorSpec]:
        cfg = model_config(module)
        text: int | str = "text_len" if shapes.text_len.min != shapes.text_len.max else shapes.text_len.opt
        c = self._noise_channels(cfg)
        return [
            TensorSpec("hidden_states", dt, ("batch", c, 1, "latent_height", "latent_width")),
            TensorSpec("timestep", dt, ("batch",)),
            TensorSpec("encoder_hidden_states", dt, ("batch", text, int(cfg["text_embed_dim"]))),
            *([TensorSpec("padding_mask", dt, (1, 1, "height", "width"))] if self._padding(cfg) else []),
        ]

    def export_spec(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, dtype: torch.dtype
    ) -> ExportSpec:
        dt = dtype_name(dtype)
        inputs = self._specs(module, shapes, dt)
        out = int(model_config(module)["out_channels"])
        outputs = [TensorSpec("latent", dt, ("batch", out, inputs[0].dims[2], "latent_height", "latent_width"))]
        opt = self.shapes_at(module, pipe_config, shapes, lambda r: r.opt)
        sample = ExampleSampler(opt, module, dtype)
        example = {}
        for spec in inputs:
            if spec.name == "timestep":
                example[spec.name] = sample.rand(spec.name)  # sigma / (sigma + 1): 0..1
            elif spec.name in ("padding_mask", "condition_mask"):
                example[spec.name] = sample.rand(spec.name).round()  # 0/1 masks
            else:
                example[spec.name] = sample.randn(spec.name)
        return ExportSpec(inputs=inputs, outputs=outputs, example_inputs=example)

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Sizes multiples of 16 (the VAE's 8 x the patch's 2), the T5 length at most 512, no frame range."""
        if shapes.text_len.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(f"export.shapes.text_len.max: {shapes.text_len.max} is above {MAX_SEQUENCE_LENGTH}")
        if shapes.frames is not None:
            raise RecipeError("export.shapes.frames: Cosmos2 Text2Image makes images; remove frames")
        self.check_size_ranges(shapes, config)

    @staticmethod
    def check_image_size(height: int, width: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        check_size_multiple(height, width, _factors(config)[2], "Cosmos' VAE factor x patch size")


class Cosmos2V2WAdapter(Cosmos2T2IAdapter):
    """Cosmos-Predict2 Video2World (``Cosmos2VideoToWorldPipeline``) from a conditioning image (``--image``): the
    image is the first frame, encoded by ``vae.encode``; the transformer predicts the rest."""

    family = "cosmos2-v2w"
    pipeline_class = "Cosmos2VideoToWorldPipeline"
    video = True
    reference_image = True
    per_prompt_key = "num_videos_per_prompt"
    graph_inputs: ClassVar[tuple[str, ...]] = (
        "hidden_states", "timestep", "encoder_hidden_states", "condition_mask", "padding_mask",
    )  # fmt: skip
    aux_components: ClassVar[dict[str, str]] = {"vae_encoder": "vae_encoder"}

    def aux_graph(self, name: str, pipe_config: dict[str, Any]) -> AuxGraph:
        from dtcompile.models.components import VaeEncoderGraph

        if name == "vae_encoder":
            return VaeEncoderGraph(pipe_config["spatial"], temporal=pipe_config["temporal"])
        raise UnsupportedError(f"components: {self.pipeline_class} has no engine component {name!r}")

    @staticmethod
    def _noise_channels(cfg: Any) -> int:
        return int(cfg["in_channels"]) - 1  # the condition mask is the last input channel

    def _latent_frames(self, shapes: Shapes, pick: Callable[[Range], int], temporal: int) -> int:
        if shapes.frames is None:
            raise RecipeError("export.shapes.frames: Video2World builds need a frame range (pixel frames, 4k+1)")
        return (pick(shapes.frames) - 1) // temporal + 1

    def shapes_at(
        self, module: torch.nn.Module, pipe_config: dict[str, Any], shapes: Shapes, pick: Callable[[Range], int]
    ) -> dict[str, tuple[int, ...]]:
        got = super().shapes_at(module, pipe_config, shapes, pick)
        b, _, f, h, w = got["hidden_states"]
        return {**got, "timestep": (b, 1, f, 1, 1), "condition_mask": (b, 1, f, h, w)}

    def _specs(self, module: torch.nn.Module, shapes: Shapes, dt: str) -> list[TensorSpec]:
        hidden, _, text, *padding = super()._specs(module, shapes, dt)
        dims = ("batch", hidden.dims[1], "latent_frames", "latent_height", "latent_width")
        return [
            TensorSpec("hidden_states", dt, dims),
            TensorSpec("timestep", dt, ("batch", 1, "latent_frames", 1, 1)),
            text,
            TensorSpec("condition_mask", dt, ("batch", 1, "latent_frames", "latent_height", "latent_width")),
            *padding,
        ]

    def _constants(self) -> dict[str, Any]:
        return {"fps": COSMOS_FPS}  # a Python number in the RoPE

    def fixed_inputs(self, config: dict[str, Any]) -> dict[str, Any]:
        """T2I's, and ``fps`` at ``COSMOS_FPS`` (another value is refused: the RoPE was traced with it)."""
        return {**super().fixed_inputs(config), "fps": COSMOS_FPS}

    def check_shapes(self, shapes: Any, config: Callable[[str], dict[str, Any] | None]) -> None:
        """Frames 4k+1 (the Wan VAE's 4x), sizes multiples of 16, the T5 length at most 512."""
        if shapes.frames is None:
            raise RecipeError("export.shapes.frames: Video2World builds need a frame range (pixel frames, 4k+1)")
        temporal = _factors(config)[0]
        for which in ("min", "opt", "max"):
            n = getattr(shapes.frames, which)
            if n < 1 or (n - 1) % temporal:
                raise RecipeError(f"export.shapes.frames.{which}: {n}: Cosmos takes {temporal}k+1 frames")
        if shapes.text_len.max > MAX_SEQUENCE_LENGTH:
            raise RecipeError(f"export.shapes.text_len.max: {shapes.text_len.max} is above {MAX_SEQUENCE_LENGTH}")
        self.check_size_ranges(shapes, config)

    @staticmethod
    def check_frames(frames: int, config: Callable[[str], dict[str, Any] | None]) -> None:
        temporal = _factors(config)[0]
        if frames < 1 or (frames - 1) % temporal:
            raise UnsupportedError(f"frames {frames}: Cosmos takes {temporal}k+1 frames (its VAE compresses 4x)")

    def call_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """Cosmos2VideoToWorldPipeline's arguments: the conditioning image (a fixed synthetic one for calibration
        and benchmarks, which pass none), ``fps`` at the exported value; frames as numpy arrays."""
        from PIL import Image

        from dtcompile.models.kontext import synthetic_reference

        kwargs = super().call_kwargs(request)
        if kwargs["output_type"] == "pil":
            kwargs["output_type"] = "np"
        image = request.image if request.image is not None else synthetic_reference(request.height, request.width)
        if not isinstance(image, Image.Image):
            raise UnsupportedError(f"image: a PIL image is expected, got {type(image).__name__}")
        kwargs["image"] = image.convert("RGB")
        kwargs["fps"] = COSMOS_FPS
        return kwargs


def _cosmos_forward_class() -> type:
    """The export wrapper: graph inputs positionally, constant keyword arguments (Video2World's ``fps``)."""
    import torch

    class CosmosForExport(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module, names: tuple[str, ...], constants: dict[str, Any]) -> None:
            super().__init__()
            self.transformer = transformer
            self.names = names
            self.constants = constants

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(self.names, inputs, strict=True))
            return self.transformer(**kwargs, **self.constants, return_dict=False)[0]

    return CosmosForExport
