"""Built-in models: pipelines dtcompile generates offline (seeded, no hub), cached under ``$DTC_CACHE_DIR``.

Each family lists its own in a ``BUILTINS`` dict of ``BuiltinModel`` in ``dtcompile/models/builtins/<family
module>.py`` (beside the adapter, not inside it); ``builtins()`` collects them across the registered families
(``dtcompile.models.ADAPTERS``). Importing this module loads no torch.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtcompile.core.digests import sha256_json, sha256_text
from dtcompile.core.errors import UnsupportedError
from dtcompile.core.files import cache_root
from dtcompile.core.versions import dist_version


@dataclass(frozen=True)
class BuiltinModel:
    """A model dtcompile can generate offline: its family, a one-line description and its generator."""

    name: str
    family: str
    description: str
    build: Callable[[int, dict[str, Any]], Any]  # (seed, config) -> the diffusers pipeline, random weights
    config: dict[str, Any]
    version: int
    code: tuple[Callable[..., Any], ...] = ()  # further functions whose source is hashed (stale-cache guard)
    denoisers: tuple[str, ...] = ()  # the denoiser components when there are several (Wan2.2's experts)

    def generate(self, out_dir: Path, seed: int = 0) -> Path:
        """Write the pipeline built from ``seed`` to ``out_dir`` in diffusers' layout (``from_pretrained`` reads it)."""
        out_dir = Path(out_dir)
        self.build(seed, self.config).save_pretrained(out_dir, safe_serialization=True)
        return out_dir

    def cache_key(self) -> str:
        """Short hash of everything that changes the generated files (config, generator, library versions)."""
        libs = {lib: dist_version(lib) for lib in ("torch", "diffusers", "transformers", "tokenizers")}
        fns: tuple[Callable[..., Any], ...] = (seeded_components, self.build, *self.code)
        code = sha256_text("".join(inspect.getsource(fn) for fn in fns))
        key = {"name": self.name, "version": self.version, "config": self.config, "libs": libs, "code": code}
        return sha256_json(key)[:12]


def by_name(*models: BuiltinModel) -> dict[str, BuiltinModel]:
    """A family's ``BUILTINS`` table: its built-in models by name."""
    return {m.name: m for m in models}


def seeded_components(seed: int, **makers: Callable[[], Any] | None) -> dict[str, Any]:
    """Pipeline components by name: the i-th maker's module in eval mode, its weights drawn from seed ``seed + i``
    inside a forked RNG, so they depend neither on construction order elsewhere nor on the caller's RNG state;
    a None maker gives None (an absent optional component)."""
    import torch

    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, make) in enumerate(makers.items()):
            torch.manual_seed(seed + offset)
            out[name] = make().eval() if make is not None else None
    return out


def builtins() -> dict[str, BuiltinModel]:
    """Every built-in model of every registered family, by name."""
    import importlib
    import importlib.util

    from dtcompile.models import ADAPTERS

    out: dict[str, BuiltinModel] = {}
    for family in ADAPTERS.names():
        # dtcompile.models.flux:FluxAdapter -> dtcompile.models.builtins.flux (a family may have no built-ins)
        name = "dtcompile.models.builtins." + ADAPTERS.path(family).partition(":")[0].rpartition(".")[2]
        if importlib.util.find_spec(name) is not None:
            out.update(getattr(importlib.import_module(name), "BUILTINS", {}))
    return out


def builtin(name: str) -> BuiltinModel:
    """The built-in model ``name`` (UnsupportedError listing the choices otherwise)."""
    known = builtins()
    if name not in known:
        raise UnsupportedError(f"unknown built-in model '{name}'; choose one of: {', '.join(known)}")
    return known[name]


def builtin_cache_root() -> Path:
    """Folder of generated built-ins: ``$DTC_CACHE_DIR/builtin`` or ``~/.cache/dtcompile/builtin``."""
    return cache_root() / "builtin"


def builtin_model_path(name: str) -> Path:
    """Path of built-in model ``name``, generating it into the cache on first use.

    Generation writes into a temporary folder next to the target and renames it into place, so a reader
    never sees a half-written model; when two processes race, the loser's copy is discarded.
    """
    model = builtin(name)
    target = builtin_cache_root() / f"{name}-{model.cache_key()}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.generate(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy into place first (the target is then a non-empty folder).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
