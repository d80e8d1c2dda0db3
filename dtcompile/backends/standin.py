"""An nn.Module that stands in for a pipeline component and runs an engine instead of torch layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from dtcompile.core.errors import UnsupportedError, VerificationError


def positional_call(names: list[str] | tuple[str, ...], args: tuple[Any, ...]) -> dict[str, Any]:
    """Positional arguments of a denoiser call by name: diffusers calls a UNet as ``unet(sample, timestep, ...)``
    (a transformer only by keyword); ``names`` are the graph inputs, or the module's forward parameters, in order."""
    if len(args) > len(names):
        raise TypeError(
            f"the component takes at most {len(names)} positional inputs ({', '.join(names)}), got {len(args)}"
        )
    return dict(zip(names, args, strict=False))


def _flat_call(kwargs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``kwargs`` with a nested dict of graph inputs (a UNet's ``added_cond_kwargs``: ``text_embeds``, ``time_ids``)
    flattened into it; a dict holding anything else (``cross_attention_kwargs``) is left for the caller to refuse."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, dict) and v and all(n in names for n in v):
            out.update(v)
        else:
            out[k] = v
    return out


class ComponentStandIn(torch.nn.Module):
    """What a diffusers pipeline touches on its transformer, without torch layers: ``config`` (the original
    component's, e.g. ``in_channels``), ``dtype``, ``device`` and ``cache_context``; ``trace``, when a list,
    receives every output (per-step noise predictions for parity checks)."""

    runner: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # set by the stand-ins that run an engine
    #: The family's ``ModelAdapter.engine_call`` (bound to the component's config) where the pipeline's keyword
    #: call is not the graph's inputs by name (Qwen-Image's RoPE); None: it is.
    call_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __init__(
        self,
        config: dict[str, Any],
        input_names: list[str],
        output_name: str,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)
        self.input_names = list(input_names)
        self.output_name = output_name
        self._dtype = dtype
        self._device = torch.device(device)
        self.trace: list[torch.Tensor | dict[str, torch.Tensor]] | None = None  # a text encoder's: its outputs by name
        width = config.get("projection_class_embeddings_input_dim")
        if width is not None:  # SDXL's pipelines check their added conditions against this UNet layer's width
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=int(width)))
        #: Keyword arguments the pipeline passes that the graph does not take: name -> the value the export fixed
        #: (a call with another value is refused), or None where the module ignores the argument (dropped).
        self.fixed_inputs: dict[str, Any] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        # diffusers' pipelines wrap calls in cache_context; a plain engine keeps no such state.
        yield

    def graph_feeds(self, kwargs: dict[str, Any], joint_attention_kwargs: Any = None) -> dict[str, torch.Tensor]:
        """The graph inputs out of the pipeline's keyword call (unused ones such as ``return_dict`` dropped)."""
        if self.call_inputs is not None:
            kwargs = self.call_inputs(kwargs)
        if joint_attention_kwargs:
            raise NotImplementedError(
                f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by engines"
            )
        kwargs = _flat_call(kwargs, self.input_names)
        for name, fixed in self.fixed_inputs.items():
            value = kwargs.pop(name, None)
            if fixed is not None and value is not None and value != fixed:
                raise UnsupportedError(f"{name} {value}: this engine was exported with {name}={fixed}; use {fixed}")
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in self.input_names)
        if extra:  # e.g. SD3's skip_layers (skip-layer guidance): an engine would silently ignore it
            raise UnsupportedError(
                f"the pipeline passed {', '.join(extra)} to the engine-backed component, which takes only "
                f"{', '.join(self.input_names)}; this pipeline option cannot run on an engine"
            )
        feeds = {name: kwargs[name] for name in self.input_names if kwargs.get(name) is not None}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"the pipeline did not pass graph inputs {missing}")
        t = feeds.get("timestep")
        if isinstance(t, torch.Tensor) and t.dim() == 0:  # a UNet call's one timestep for the whole batch
            feeds["timestep"] = t.reshape(1).repeat(
                len(feeds[self.input_names[0]])
            )  # contiguous: engines bind pointers
        return feeds

    def call_engine(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``self.runner(feeds)``; an engine that refuses its inputs (a shape or channel count outside what it was
        built for, because the manifest's shape ranges or component config were edited) is one ArtifactError."""
        from dtcompile.core.errors import ArtifactError, DtcError

        try:
            return self.runner(feeds)
        except DtcError:
            raise
        except Exception as exc:  # onnxruntime's InvalidArgument/Fail, TensorRT's errors: all "refused this input"
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items() if hasattr(v, "shape"))
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ArtifactError(
                f"the engine standing in for the component refused its inputs ({shapes}): {first}; the artifact's "
                "manifest (shape ranges, component config) does not match its engine: rebuild it or pull it again"
            ) from None

    def denoising_step(self, feeds: dict[str, Any], call: int) -> int:
        """The denoising step of this run a call belongs to, counted from the ``timestep`` input: calls with the
        same timestep (classifier-free guidance run as two calls) are one step, and a higher timestep than the last
        starts a new run (timesteps fall during a run). Without a timestep input: the call number."""
        t = feeds.get("timestep")
        try:
            # the largest: per-token timesteps (Wan2.2 TI2V's expand_timesteps) hold 0 for the conditioning frame
            value = float(t.reshape(-1).max()) if t is not None else None
        except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
            value = None
        if value is None:
            return call + 1
        last = getattr(self, "_last_timestep", None)
        if last is None or value > last:
            self._run_step = 1
        elif value != last:
            self._run_step += 1
        self._last_timestep = value
        return self._run_step

    def check_finite(self, out: torch.Tensor, call: int, step: int | None = None) -> torch.Tensor:
        """``out``, or VerificationError when it holds NaN or Inf (a black image otherwise); ``step``: the
        denoising step of the call (``denoising_step``; None for a component called once per prompt)."""
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            where = f" (denoising step {step} of this run)" if step is not None else ""
            raise VerificationError(
                f"the engine standing in for the component returned {bad} NaN/Inf value(s) at call {call + 1}"
                f"{where}; check the inputs (guidance, LoRA scale) or rebuild"
            )
        return out


class EngineModule(ComponentStandIn):
    """Stands in for ``pipe.transformer``: maps the pipeline's keyword call onto one engine's graph inputs."""

    def __init__(
        self,
        runner: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        config: dict[str, Any],
        input_names: list[str],
        output_name: str,
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> None:
        super().__init__(config, input_names, output_name, dtype, device)
        self.runner = runner
        self.calls = 0

    def forward(self, *args: Any, return_dict: bool = True, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
        feeds = self.graph_feeds({**positional_call(self.input_names, args), **kwargs}, joint_attention_kwargs)
        step = self.denoising_step(feeds, self.calls)
        out = self.check_finite(
            self.call_engine(feeds)[self.output_name].to(self._device, self._dtype), self.calls, step
        )
        self.calls += 1
        if self.trace is not None:
            self.trace.append(out.detach().clone())
        return (out,) if not return_dict else {"sample": out}


class _EngineCalls(ComponentStandIn):
    """A stand-in that runs one engine and hands back every graph output by name."""

    def __init__(
        self,
        runner: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        config: dict[str, Any],
        input_names: list[str],
        output_names: list[str],
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> None:
        super().__init__(config, input_names, output_names[0], dtype, device)
        self.runner = runner
        self.output_names = list(output_names)
        self.calls = 0

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = self.call_engine(feeds)
        got = {n: self.check_finite(outs[n].to(self._device, self._dtype), self.calls) for n in self.output_names}
        self.calls += 1
        return got


class PenultimateHiddenStates(tuple):
    """``hidden_states`` of a text encoder engine: only ``[-2]`` (the penultimate layer, what SD3 reads with
    ``clip_skip`` unset) is in the graph; any other index is refused rather than answered wrongly."""

    def __getitem__(self, index: Any) -> Any:
        if index != -2:
            raise UnsupportedError(
                f"hidden_states[{index}]: the text encoder engine has only the penultimate layer "
                "(hidden_states[-2]); clip_skip and other layers need the torch text encoder"
            )
        return tuple.__getitem__(self, 0)


class TextEncoderModule(_EngineCalls):
    """Stands in for a transformers text encoder (CLIP, T5): ``input_ids`` in, the output object the
    pipeline reads (``last_hidden_state``, ``pooler_output`` or ``text_embeds``, ``hidden_states[-2]``)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        if attention_mask is not None:
            raise UnsupportedError("the text encoder engine was built without attention_mask (pipelines pad instead)")
        feeds = self.graph_feeds({"input_ids": input_ids, **kwargs})
        got = self.run(feeds)
        if self.trace is not None:
            self.trace.append({k: v.detach().clone() for k, v in got.items()})
        hidden = got.get("penultimate_hidden_state")
        if output_hidden_states and hidden is None:
            raise UnsupportedError("output_hidden_states: the text encoder engine has no hidden-state outputs")
        fields: dict[str, Any] = {k: got[k] for k in ("text_embeds", "last_hidden_state", "pooler_output") if k in got}
        if hidden is not None:
            fields["hidden_states"] = PenultimateHiddenStates((hidden, got.get("last_hidden_state")))
        from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        cls = (
            CLIPTextModelOutput
            if "text_embeds" in got
            else BaseModelOutputWithPooling
            if "pooler_output" in got
            else BaseModelOutput
        )
        out = cls(**fields)
        return out if return_dict else out.to_tuple()


class VaeDecoderModule(_EngineCalls):
    """Stands in for the pipeline's VAE where only decoding is engine-backed: ``decode(latent)`` runs the
    engine; ``encode`` is refused (image-to-image needs a ``vae_encoder`` component)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedError("the VAE engine only decodes (vae.decode); vae(...) needs the torch VAE")

    #: set by the runtime for a VAE engine built for tiles (``runtime.tiling.tiler``): (latent, engine call) -> sample
    tiler: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        kwargs.pop("generator", None)  # diffusers passes one for sampling; decoding is deterministic

        def engine(latent: torch.Tensor) -> torch.Tensor:
            return self.run(self.graph_feeds({"latent": latent, **kwargs}))["sample"]

        sample = engine(z) if self.tiler is None else self.tiler(z, engine)
        if self.trace is not None:
            self.trace.append(sample.detach().clone())
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedError(
            "vae.encode: this artifact's VAE is engine-backed for decoding only (component vae_decoder); "
            "image inputs need the VAE encoder too: rebuild with vae_encoder in components"
        )


class VaeEncoderModule(_EngineCalls):
    """Stands in for the pipeline's VAE where encoding is engine-backed: ``encode(x)`` runs the engine and
    returns what diffusers' ``vae.encode`` returns (``AutoencoderKLOutput`` with a ``DiagonalGaussianDistribution``
    of the engine's ``moments``: ``latent_dist.mode()`` / ``.sample(generator)`` compute as in torch);
    ``decode`` goes to ``decoder`` (the torch VAE or the ``vae_decoder`` engine's stand-in, set by ``attach``).

    A video VAE's graph takes a fixed frame count (``frames``, the graph input's): a shorter video is padded with
    zero frames at the end and the leading ``(n - 1) // temporal + 1`` latent frames are kept, exact for a causal
    encoder (Wan's: every latent frame depends only on the frames up to it).
    """

    frames: int | None = None  # a video VAE graph's fixed pixel frames (None: an image VAE)

    def attach(self, decoder: Any) -> None:
        """``decoder`` answers ``decode`` (the VAE's other half: torch, or the ``vae_decoder`` engine)."""
        self.decoder = decoder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedError("the VAE engine encodes (vae.encode) and decodes (vae.decode); vae(...) needs torch")

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        decoder = getattr(self, "decoder", None)
        if decoder is None:
            raise UnsupportedError("vae.decode: this VAE stand-in has no decoder attached")
        if args and isinstance(args[0], torch.Tensor):  # the pipeline casts to vae.dtype: this encoder's
            args = (args[0].to(decoder.dtype), *args[1:])
        return decoder.decode(*args, **kwargs)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded with zero frames at the end to the graph's frame count (an image VAE's ``x`` as is)."""
        if self.frames is None:
            return x
        n = int(x.shape[2])
        if n > self.frames:
            raise UnsupportedError(
                f"vae.encode: {n} frames, more than the {self.frames} the VAE encoder engine was built for "
                "(export.shapes.frames.max); rebuild with a larger frame range"
            )
        if n == self.frames:
            return x
        return torch.cat([x, x.new_zeros(*x.shape[:2], self.frames - n, *x.shape[3:])], dim=2)

    def _kept(self, moments: torch.Tensor, n: int) -> torch.Tensor:
        """The leading latent frames of ``n`` pixel frames; the temporal factor is read off the engine's own output
        (``frames`` pixel frames made ``L`` latent frames: ``(frames - 1) / (L - 1)``)."""
        assert self.frames is not None
        made = int(moments.shape[2])
        temporal = (self.frames - 1) // (made - 1) if made > 1 else max(self.frames - 1, 1)
        if (n - 1) % temporal:
            raise UnsupportedError(f"vae.encode: {n} frames; the VAE encodes {temporal}k+1 frames")
        return moments[:, :, : (n - 1) // temporal + 1]

    def encode(self, x: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        n = int(x.shape[2]) if x.dim() == 5 else 1
        padded = self._padded(x.to(self._dtype))
        # the graph takes one image a call (the pipelines encode one conditioning image); a batch runs per item
        moments = torch.cat(
            [self.run(self.graph_feeds({"sample": item, **kwargs}))["moments"] for item in padded.split(1)]
        )
        if self.frames is not None:
            moments = self._kept(moments, n)
        if self.trace is not None:
            self.trace.append(moments.detach().clone())
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


class ImageEncoderModule(_EngineCalls):
    """Stands in for a CLIP vision tower (``image_encoder``): ``pixel_values`` in; the output's
    ``hidden_states[-2]`` (the graph's one output) is what WanImageToVideoPipeline reads; other layers are
    refused."""

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, return_dict: bool = True,
                **kwargs: Any) -> Any:  # fmt: skip
        got = self.run(self.graph_feeds({"pixel_values": pixel_values.to(self._dtype), **kwargs}))
        hidden = got["penultimate_hidden_state"]
        if self.trace is not None:
            self.trace.append(hidden.detach().clone())
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(hidden_states=PenultimateHiddenStates((hidden, None)))
        return out if return_dict else out.to_tuple()


#: ``AuxEntry.role`` -> the stand-in the runtime puts on the pipeline attribute.
STANDINS: dict[str, type[_EngineCalls]] = {
    "text_encoder": TextEncoderModule,
    "vae_decoder": VaeDecoderModule,
    "vae_encoder": VaeEncoderModule,
    "image_encoder": ImageEncoderModule,
}
