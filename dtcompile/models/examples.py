"""What the export code reads from a torch model, shared by the family adapters (``models/<family>.py``) and the
component graphs (``models/components.py``): its config and seeded example inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def model_config(module: torch.nn.Module) -> Any:
    """``module.config``: a diffusers model's frozen dict, a transformers model's ``PretrainedConfig`` (torch types
    every module attribute as ``Tensor | Module``, which neither is)."""
    config: Any = module.config
    return config


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
