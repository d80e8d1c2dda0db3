"""An nn.Module that stands in for a pipeline component and runs an engine instead of torch layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dtcompile.core.errors import UnsupportedError, VerificationError


class ComponentStandIn(torch.nn.Module):
    """What a diffusers pipeline touches on its transformer, without torch layers: ``config`` (the original
    component's, e.g. ``in_channels``), ``dtype``, ``device`` and ``cache_context``; ``trace``, when a list,
    receives every output (per-step noise predictions for parity checks)."""

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
        self.trace: list[torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        # diffusers' pipelines wrap calls in cache_context; a plain engine keeps no such state.
        yield

    def graph_feeds(self, kwargs: dict[str, Any], joint_attention_kwargs: Any = None) -> dict[str, torch.Tensor]:
        """The graph inputs out of the pipeline's keyword call (unused ones such as ``return_dict`` dropped)."""
        if joint_attention_kwargs:
            raise NotImplementedError(
                f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by engines"
            )
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
        return feeds

    def check_finite(self, out: torch.Tensor, call: int) -> torch.Tensor:
        """``out``, or VerificationError when it holds NaN or Inf (a black image otherwise)."""
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise VerificationError(
                f"the engine standing in for the component returned {bad} NaN/Inf value(s) at call {call + 1} "
                f"(denoising step {call + 1} of this run); check the inputs (guidance, LoRA scale) or rebuild"
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

    def forward(self, return_dict: bool = True, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
        feeds = self.graph_feeds(kwargs, joint_attention_kwargs)
        out = self.check_finite(self.runner(feeds)[self.output_name].to(self._device, self._dtype), self.calls)
        self.calls += 1
        if self.trace is not None:
            self.trace.append(out.detach().clone())
        return (out,) if not return_dict else {"sample": out}
