"""Per-request LoRA in the server (``dtc serve --lora-dir``): the adapter folder, a request's ``lora`` list
checked into an adapter set, the swap before each batch (counted and timed in /metrics) and the worker's pick
that keeps swaps few.

Adapters are the ``.safetensors`` files in the folder, named by their stem. At start-up each is checked against
each served model's weight map (``tools.live_lora.LiveLoras``); one log line per refusal names the file and why,
and a refused adapter is not offered for that model. A request names adapters with strengths
(``"lora": [{"name": "style", "scale": 0.8}]``, the openai client's ``extra_body``); the set is canonical (sorted
by name, scale-0 entries dropped), so requests that mean the same weights share a batch and a swap.

The swap policy: the worker takes the oldest queued job whose model already holds its adapter set, so queued
requests are grouped by set, unless the oldest job has waited ``max_wait`` seconds (then it goes first, swap or
not): grouping never starves a request for longer than that.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import DtcError
from dtcompile.serve.protocol import APIError
from dtcompile.tools.live_lora import Choice, LiveLoras, describe, live_lora_blocker, lora_files

if TYPE_CHECKING:
    from dtcompile.serve.models import ServedModel
    from dtcompile.serve.protocol import LoraItem
    from dtcompile.serve.scheduler import Job

log = logging.getLogger("dtcompile.serve")


class ServedLoras:
    """The server's adapters per model and the set each model's denoiser holds now.

    ``folder``: ``--lora-dir`` (None: no adapters, and a request naming one gets 400); ``max_wait``: how long
    the oldest queued job may be passed over to save a swap; ``on_swap(model, seconds)``: called after each
    swap (the metrics).
    """

    def __init__(
        self, folder: Path | None, max_wait: float, on_swap: Callable[[str, float], None] | None = None
    ) -> None:
        self.files = lora_files(folder) if folder is not None else {}
        self.folder = folder
        self.max_wait = max_wait
        self.on_swap = on_swap or (lambda model, seconds: None)
        self.models: dict[str, LiveLoras] = {}
        self.blocked: dict[str, str] = {}

    def attach(self, model: ServedModel) -> None:
        """Check every adapter against the loaded ``model`` (start-up): one warning per refusal."""
        if self.folder is None:
            return
        reason = live_lora_blocker(model.session)
        if reason is not None:
            self.blocked[model.name] = reason
            log.warning("--lora-dir: model %s takes no per-request LoRA: %s", model.name, reason)
            return
        live = LiveLoras(model.session, self.files)
        for name, why in live.refused.items():
            log.warning("--lora-dir: %s refused for model %s: %s", self.files[name].name, model.name, why)
        self.models[model.name] = live
        log.info("--lora-dir: model %s offers %d adapter(s): %s", model.name, len(live.adapters),
                 ", ".join(live.adapters) or "none")  # fmt: skip

    def offered(self, model: str) -> list[str]:
        """The adapter names ``model`` takes."""
        live = self.models.get(model)
        return list(live.adapters) if live is not None else []

    def choice(self, model: str, items: Sequence[LoraItem] | None) -> Choice:
        """A request's ``lora`` list as ``model``'s canonical adapter set; APIError 400 naming the parameter."""
        if not items:
            return ()
        if self.folder is None:
            raise APIError(400, "lora: this server has no adapters (start dtc serve with --lora-dir)", param="lora")
        if model in self.blocked:
            raise APIError(400, f"lora: model {model} cannot take per-request LoRA: {self.blocked[model]}",
                           param="lora")  # fmt: skip
        offered = self.offered(model)
        seen: dict[str, float] = {}
        for i, item in enumerate(items):
            if item.name not in offered:
                raise APIError(
                    400, f"lora.{i}.name: no adapter {item.name!r} for model {model} (offered: "
                    f"{', '.join(offered) or 'none'})", param=f"lora.{i}.name",
                )  # fmt: skip
            if item.name in seen:
                raise APIError(400, f"lora.{i}.name: {item.name!r} is named twice", param=f"lora.{i}.name")
            _check_scale(item.scale, f"lora.{i}.scale")
            seen[item.name] = float(item.scale)
        return tuple(sorted((n, s) for n, s in seen.items() if s != 0.0))

    def loaded(self, model: str) -> Choice:
        live = self.models.get(model)
        return live.loaded if live is not None else ()

    def activate(self, model: str, choice: Choice) -> None:
        """Swap ``choice`` into ``model`` unless it holds it already (the worker, before a batch); APIError 400
        when the adapters cannot be applied (the model keeps its weights)."""
        live = self.models.get(model)
        if live is None:
            return  # choice() let only () through
        try:
            seconds = live.activate(choice)
        except DtcError as exc:
            raise APIError(400, f"lora {describe(choice)}: {exc}", param="lora") from None
        if seconds is not None:
            self.on_swap(model, seconds)

    def pick(self, queue: Sequence[Job]) -> int:
        """The index of the queued job the worker takes next (see the module docstring)."""
        if not self.models or not queue or time.monotonic() - queue[0].enqueued >= self.max_wait:
            return 0
        for i, job in enumerate(queue):
            if job.lora == self.loaded(job.model) and not job.future.cancelled():
                return i
        return 0


def _check_scale(scale: float, param: str) -> None:
    from dtcompile.recipe.schema import LORA_SCALE_MAX

    if not math.isfinite(scale) or abs(scale) > LORA_SCALE_MAX:
        raise APIError(
            400, f"{param}: {scale:g} is outside -{LORA_SCALE_MAX:g}..{LORA_SCALE_MAX:g} (typical: 0.5 to 1.5)",
            param=param,
        )  # fmt: skip


def form_lora(items: Sequence[tuple[str, str]]) -> Any:
    """A multipart form's ``lora`` (an edit): the openai client's ``lora[][name]`` / ``lora[][scale]`` pairs, or
    one ``lora`` field holding the JSON list; None when the form has none. Shape errors are left to the request
    model (400 naming ``lora``)."""
    out: list[dict[str, str]] = []
    for key, value in items:
        if key == "lora":
            try:
                return json.loads(value)
            except ValueError:
                raise APIError(400, "lora: expected a JSON list such as [{\"name\": \"style\", \"scale\": 0.8}]",
                               param="lora") from None  # fmt: skip
        field = key.removeprefix("lora[]").strip("[]")
        if not out or field in out[-1]:  # a field seen again starts the next adapter
            out.append({})
        out[-1][field] = value
    return out or None
