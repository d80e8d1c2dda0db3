"""Ulysses sequence parallel: one denoiser call's tokens split over the ranks of a sequence group.

Input: an artifact of a family with a sequence-parallel form (``ModelAdapter.ulysses``: Wan2.1/2.2, FLUX.1) and
the ranks of ``runtime/parallel.py``. Output: a ``UlyssesModule`` standing in for each denoiser on every rank.

Each rank holds ``1/P`` of the tokens through every block. Before each attention an all-to-all trades the
sequence split for a head split (every rank: all tokens, ``H/P`` heads), attention runs over every token, and a
second all-to-all trades back (DeepSpeed-Ulysses, as xDiT and TensorRT-LLM VisualGen do it). The denoiser runs in
PyTorch on each rank, loaded from the artifact's source model (checked against the digest the build recorded):
an engine has no point inside it where a collective can run, so the engine form needs every block split at its
attention (docs/parallel.md: the prototype and what it costs). ``SequenceGroup`` counts the bytes each rank sends;
``predicted_bytes`` is the formula from the shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import ArtifactError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from dtcompile.manifest import Manifest
    from dtcompile.models.base import UlyssesLayout

log = logging.getLogger("dtcompile.run")


class SequenceGroup:
    """The ranks one denoiser call's sequence is split over (``group``: a torch.distributed process group; None
    with ``size`` 1: one rank, no collectives). ``bytes_sent``: what this rank sent the others so far."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        self.bytes_sent = 0

    def shard(self, x: torch.Tensor, dim: int, what: str = "tokens") -> torch.Tensor:
        """This rank's contiguous slice of ``x`` along ``dim``; UnsupportedError when it does not divide evenly."""
        n = x.shape[dim]
        if n % self.size:
            raise UnsupportedError(
                f"--parallel ulysses={self.size}: {n} {what} do not split evenly over {self.size} ranks; pick a size "
                f"(or text length) whose token count divides by {self.size}"
            )
        step = n // self.size
        return x.narrow(dim, self.rank * step, step)

    def all_to_all(self, x: torch.Tensor, scatter: int, gather: int) -> torch.Tensor:
        """``x`` split in ``size`` chunks along ``scatter``, chunk i sent to rank i, and the chunks received
        joined along ``gather`` in rank order (one ``all_to_all_single``)."""
        import torch
        import torch.distributed as dist

        if self.size == 1:
            return x
        send = torch.stack(x.chunk(self.size, dim=scatter)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        self.bytes_sent += send.numel() * send.element_size() * (self.size - 1) // self.size
        return torch.cat(recv.unbind(0), dim=gather)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this rank's queries over every rank's keys: q, k, v are (batch, local tokens, heads,
        head dim); returns the same shape. Heads must divide by the group size."""
        import torch.nn.functional as F

        heads = q.shape[2]
        if heads % self.size:
            raise UnsupportedError(
                f"--parallel ulysses={self.size}: the model's {heads} attention heads do not split over {self.size} "
                "ranks; use a rank count that divides the heads"
            )
        q, k, v = (self.all_to_all(t, 2, 1) for t in (q, k, v))  # (batch, all tokens, heads / P, head dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.all_to_all(out.transpose(1, 2), 1, 2)  # back to (batch, local tokens, heads, head dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` joined along ``dim`` in rank order (one ``all_gather``)."""
        import torch
        import torch.distributed as dist

        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self.bytes_sent += x.numel() * x.element_size() * (self.size - 1)
        return torch.cat(parts, dim=dim)


@dataclass(frozen=True)
class UlyssesBytes:
    """Bytes one rank sends per denoiser call, from the shapes: the all-to-alls and the output gather."""

    all_to_all: int
    gather: int

    @property
    def total(self) -> int:
        return self.all_to_all + self.gather


def predicted_bytes(layout: UlyssesLayout, ranks: int, batch: int, element_size: int) -> UlyssesBytes:
    """What each rank of ``ranks`` sends per denoiser call (docs/parallel.md): each attention call makes four
    all-to-alls (q, k, v, output) of the rank's ``batch x tokens/P x width`` values, of which ``(P-1)/P`` go to
    other ranks; the output gather sends the rank's ``batch x out_tokens/P x out_width`` values to ``P-1`` ranks."""
    p = ranks
    local = batch * (layout.tokens // p) * layout.width * element_size
    a2a = layout.attention_calls * 4 * (local * (p - 1) // p)
    gather = batch * (layout.out_tokens // p) * layout.out_width * element_size * (p - 1)
    return UlyssesBytes(a2a, gather)


def ulysses_module(inner: torch.nn.Module, adapter: Any, comm: SequenceGroup, rank: int, config: dict[str, Any],
                   dtype: torch.dtype, device: str) -> Any:  # fmt: skip
    """The ``UlyssesModule`` standing in for a denoiser: ``inner`` (the torch transformer) run through the
    family's sequence-parallel form over ``comm``; ``rank``: this process's rank (fault hook)."""
    from dtcompile.backends.standin import ComponentStandIn
    from dtcompile.runtime.parallel import fault_point

    class UlyssesModule(ComponentStandIn):
        """Runs this rank's slice of every denoiser call (module docstring); ``bytes_sent`` is ``comm``'s."""

        def __init__(self) -> None:
            super().__init__(config, list(adapter.graph_inputs), "latent", dtype, device)
            self.model = adapter.ulysses_module(inner, comm)
            self.comm, self.rank = comm, rank
            self.calls = 0

        @property
        def bytes_sent(self) -> int:
            return self.comm.bytes_sent

        @bytes_sent.setter
        def bytes_sent(self, value: int) -> None:
            self.comm.bytes_sent = value

        def forward(self, return_dict: bool = True, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
            import torch

            if joint_attention_kwargs:
                raise UnsupportedError(f"--parallel ulysses: joint_attention_kwargs {sorted(joint_attention_kwargs)} "
                                       "are not supported")  # fmt: skip
            fault_point(self.rank, self.calls)
            with torch.inference_mode():
                out = self.model(**{k: v for k, v in kwargs.items() if v is not None})
            out = self.check_finite(out.to(self._dtype), self.calls)
            self.calls += 1
            if self.trace is not None:
                self.trace.append(out.detach().clone())
            return (out,) if not return_dict else {"sample": out}

    return UlyssesModule()


def check_ulysses(manifest: Manifest, adapter: Any, ranks: int, pipeline_class: str) -> None:
    """UnsupportedError unless the artifact's denoisers can run Ulysses over ``ranks`` ranks: a family with a
    sequence-parallel form, heads that divide by ``ranks``, and engines that hold the source model's own weights
    (no quantization, no LoRA fused at build: the torch path loads the source model)."""
    flag = f"--parallel ulysses={ranks}"
    if not getattr(adapter, "ulysses", False):
        raise UnsupportedError(f"{flag}: {pipeline_class} artifacts have no sequence-parallel form (Wan and FLUX.1 do)")
    recipe = manifest.recipe or {}
    if recipe.get("quant") or manifest.lora is not None or recipe.get("lora"):
        raise UnsupportedError(
            f"{flag}: the artifact's engines are quantized or carry a LoRA, and Ulysses runs the source model in "
            "PyTorch on each rank (docs/parallel.md); use an unquantized artifact without build-time LoRAs"
        )
    for name in manifest.denoiser_names():
        config = manifest.component(name).config or {}
        heads = int(config.get("num_attention_heads", 0))
        if heads % ranks:
            raise UnsupportedError(
                f"{flag}: {name} has {heads} attention heads, which do not split over {ranks} ranks; use a rank "
                "count that divides the heads"
            )


def source_folder(manifest: Manifest) -> Path:
    """The artifact's source pipeline folder on this machine, found as the build found it: a built-in (generated
    into the cache when missing), a local folder, or a hub id already in the local Hugging Face cache (nothing is
    downloaded at run time)."""
    model = (manifest.recipe or {}).get("model") or {}
    source, revision = str(model.get("source") or manifest.source.model), model.get("revision")
    if source.startswith("builtin:"):
        from dtcompile.models.builtin import builtin_model_path

        return builtin_model_path(source.removeprefix("builtin:"))
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception as exc:  # the hub raises many types (not cached, no such repo)
        raise ArtifactError(
            f"--parallel ulysses: the artifact's source model {source} is not on this machine ({type(exc).__name__}); "
            "Ulysses runs the source model in PyTorch on each rank: download it (or build from a local folder) first"
        ) from None


def load_source_denoiser(manifest: Manifest, name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The torch denoiser ``name`` of the artifact's source model (``source_folder``), refused when the main
    component's files no longer have the digest the build recorded."""
    import json

    import diffusers

    from dtcompile.core.digests import sha256_tree

    folder = source_folder(manifest) / name
    if name == manifest.main_component() and sha256_tree(folder) != manifest.source.component_sha256:
        raise ArtifactError(
            f"--parallel ulysses: {folder} changed since the artifact was built (its files have another sha256); "
            "Ulysses runs the source model's weights: rebuild the artifact"
        )
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ArtifactError(f"{folder}/config.json: diffusers has no model class {class_name!r}")
    log.info("ulysses: loading %s %s from %s", class_name, name, folder)
    model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()
