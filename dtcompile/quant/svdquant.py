"""SVDQuant: NVFP4 plus a high-precision low-rank branch per linear layer (ModelOpt's ``svdquant``).

Each quantized weight W becomes L1 @ L2 (rank ``rank``, kept in the model's precision) plus a residual
W - L1 @ L2 quantized to NVFP4; activation outliers are first smoothed into the weights (AWQ-lite). The
exported graph is the NVFP4 graph plus two plain MatMuls per layer for the branch, so it has the same
requirements as nvfp4 (Blackwell; TensorRT's FP4 custom op, which onnxruntime cannot run).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar

from dtcompile.core.errors import UnsupportedError
from dtcompile.quant.nvfp4 import Nvfp4Format

if TYPE_CHECKING:
    from dtcompile.recipe.quant import SvdquantSpec


class SvdquantFormat(Nvfp4Format["SvdquantSpec"]):
    """svdquant: NVFP4 residual + rank-``rank`` high-precision branch on every linear layer not excluded."""

    name: ClassVar[str] = "svdquant"
    description: ClassVar[str] = "NVFP4 with a high-precision low-rank branch (SVDQuant, AWQ-lite smoothing)"

    def algorithm(self, spec: SvdquantSpec) -> dict[str, Any]:
        """ModelOpt's SVDQuant with the spec's rank."""
        return {"method": "svdquant", "lowrank": spec.rank}

    def check_module(self, spec: SvdquantSpec, module: Any, exclude: Iterable[str]) -> None:
        """The rank must be below both dims of every linear layer that gets quantized."""
        import torch

        patterns = list(exclude)
        narrowest: tuple[int, str] | None = None
        for name, sub in module.named_modules():
            if not isinstance(sub, torch.nn.Linear) or _excluded(name, patterns):
                continue
            width = min(sub.in_features, sub.out_features)
            if narrowest is None or width < narrowest[0]:
                narrowest = (width, name)
        if narrowest is not None and spec.rank >= narrowest[0]:
            width, name = narrowest
            raise UnsupportedError(
                f"quant.rank {spec.rank} must be below the width of every quantized linear layer, but '{name}' "
                f"is {width} wide; set quant.rank to at most {width - 1} (or exclude '{name}')"
            )

    def check_width(self, spec: SvdquantSpec, width: int) -> str | None:
        """The rank must be below the model's hidden width (its narrowest quantized layers)."""
        if spec.rank < width:
            return None
        return f"quant.rank {spec.rank} must be below the model width {width}; set quant.rank to at most {width - 1}"

    def manifest(self, spec: SvdquantSpec) -> dict[str, Any]:
        """The nvfp4 entry plus the low-rank branch's rank."""
        return {**super().manifest(spec), "rank": spec.rank}


def _excluded(name: str, patterns: list[str]) -> bool:
    """Whether module ``name`` or one of its parents matches an exclude pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatchcase(p, pat) for p in prefixes for pat in patterns)
