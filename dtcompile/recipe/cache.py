"""The ``cache:`` recipe section, the transformer's block names, segments and step rules.

Input: a recipe's ``cache`` mapping and the transformer's config (``num_layers``, ``num_single_layers``).
Output: a validated ``CacheSpec`` and the ``Segment`` list the export stage cuts the transformer into.

Two modes::

    cache:                          # static block caching (ModelOpt cachify / DeepCache style)
      mode: static
      steps: 8                      # the num_inference_steps the rules below are written for
      groups:
        - name: singles
          blocks: ["single_transformer_blocks.*"]   # fnmatch patterns on block names
          every: 2                  # compute on steps 0, 2, 4, ...; reuse the residual in between
          start: 1                  # optional: first step that may be cached (default 1)
          end: 7                    # optional: steps >= end are always computed
        - name: mid
          blocks: ["transformer_blocks.1"]
          steps: [3, 5]             # or an explicit list of cached steps

    cache:                          # dynamic first-block caching (FBCache / TeaCache style)
      mode: first_block
      threshold: 0.1                # skip the other blocks when the first block's output residual changed
                                    # by less than this (relative L1) since the last full step
      max_consecutive_skips: 2

    cache:                          # TeaCache: decided before any block runs
      mode: teacache
      threshold: 0.2                # skip all blocks while the accumulated, rescaled change of the model's
                                    # signal (FLUX: the first block's modulated input; Wan: the timestep
                                    # embedding) stays below this
      retention: 1                  # optional: the first steps always computed (default 1)
      coefficients: [498.65, ...]   # optional: the rescaling polynomial (default: the family's published one)

A rule with only ``start``/``end`` caches every step of that range. Step 0 is always computed (nothing is cached
yet). Blocks are ``transformer_blocks.<i>`` (double-stream) then ``single_transformer_blocks.<i>``; the export
splits them into segments: maximal runs of consecutive blocks that belong to the same group (or to none).

This module imports no torch: the dry run uses it before any weights load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dtcompile.core.errors import RecipeError, UnsupportedError
from dtcompile.recipe.base import ItemError
from dtcompile.recipe.base import Strict as _Strict

MODES = ("static", "first_block", "teacache")


def _item_error(index: int, message: str, field: str) -> ValueError:
    """A validator error that the loader reports as ``<field>[index]: message``."""
    return ItemError(index, message, field=field)


class CacheGroupSpec(_Strict):
    """A group of blocks cached together, and the steps on which it is cached (static mode)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    """The group's name (in reports and the manifest)."""
    blocks: list[str] = Field(min_length=1)
    """fnmatch patterns on block names; each must match a block."""
    every: int | None = Field(default=None, ge=2)
    """Compute on every ``every``-th step and reuse the cached residual in between."""
    start: int | None = Field(default=None, ge=1)
    """First step that may be cached."""
    end: int | None = Field(default=None, ge=1)
    """Steps from ``end`` on are always computed."""
    steps: list[int] | None = Field(default=None, min_length=1)
    """An explicit list of cached steps (instead of ``every``)."""

    @field_validator("blocks", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("blocks")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            if not pattern.strip():
                raise _item_error(i, "blank pattern; give a block-name glob such as 'transformer_blocks.1*'", "")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate pattern in {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _step_list(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        for i, step in enumerate(value):
            if step == 0:
                raise _item_error(i, "step 0 is always computed (nothing is cached yet); cache steps >= 1", "")
            if step < 0:
                raise _item_error(i, f"{step}: steps count from 0; cache steps >= 1", "")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate step in {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _one_rule(self) -> CacheGroupSpec:
        ranged = self.every is not None or self.start is not None or self.end is not None
        if self.steps is not None and ranged:
            raise ValueError("steps (a list) cannot be combined with every/start/end; use one kind of rule")
        if self.steps is None and not ranged:
            raise ValueError(
                "no step rule; give every (compute every Nth step), start/end (cache a step range) or steps (a list)"
            )
        if self.end is not None and self.end <= self.first:
            raise ValueError(f"end {self.end} must be greater than start {self.first}")
        return self

    @property
    def first(self) -> int:
        """First step a ranged rule may cache."""
        return 1 if self.start is None else self.start

    def cached_at(self, step: int) -> bool:
        """Whether this group reuses its residual at denoising step ``step`` (0-based)."""
        if self.steps is not None:
            return step in self.steps
        if step < self.first or (self.end is not None and step >= self.end):
            return False
        return self.every is None or step % self.every != 0

    def cached_steps(self, num_steps: int) -> list[int]:
        """Every step of a ``num_steps`` schedule on which the group is cached."""
        return [s for s in range(num_steps) if self.cached_at(s)]

    def last_step_named(self) -> int | None:
        """The largest step the rule refers to explicitly (for schedule checks), or None."""
        if self.steps is not None:
            return self.steps[-1]
        named = [s for s in (self.start, None if self.end is None else self.end - 1) if s is not None]
        return max(named) if named else None

    def describe(self, num_steps: int | None = None) -> str:
        """One line for plans and reports: the rule, plus the cached steps of a schedule."""
        if self.steps is not None:
            rule = f"steps {self.steps}"
        else:
            rule = f"every {self.every}" if self.every else "every step"
            rule += f" from step {self.first}" + (f" to {self.end - 1}" if self.end is not None else "")
        if num_steps is not None:
            rule += f" -> cached on {self.cached_steps(num_steps)} of {num_steps} steps"
        return rule


#: The dynamic modes' keys and the modes each applies to.
_DYNAMIC_KEYS: dict[str, tuple[str, ...]] = {
    "threshold": ("first_block", "teacache"),
    "max_consecutive_skips": ("first_block",),
    "retention": ("teacache",),
    "coefficients": ("teacache",),
}


class CacheSpec(_Strict):
    """The ``cache:`` section: static block groups with step rules, or dynamic first-block caching."""

    mode: Literal["static", "first_block", "teacache"]
    """"static": rules per block group; "first_block": skip the other blocks while the first block barely changes;
    "teacache": skip every block while the model's rescaled timestep-embedding signal barely changes."""
    # static
    steps: int | None = Field(default=None, ge=1)
    """static: the num_inference_steps the rules are written for (runs must use it)."""
    groups: list[CacheGroupSpec] | None = Field(default=None, min_length=1)
    """static: the block groups and their step rules."""
    # first_block
    threshold: float | None = Field(default=None, ge=0)
    """first_block: relative L1 change of the first block's residual below which the rest is skipped."""
    max_consecutive_skips: int | None = Field(default=None, ge=1)  # first_block default: 2
    """first_block: at most this many skipped calls in a row (default 2)."""
    # teacache (threshold too)
    retention: int | None = Field(default=None, ge=0)
    """teacache: the first steps of a run always computed (default 1), as TeaCache's ``ret_steps``."""
    coefficients: list[float] | None = Field(default=None, min_length=1, max_length=16)
    """teacache: the polynomial (highest power first, numpy.poly1d's order) that rescales the signal's relative
    L1 change into an estimate of the output's (default: the family's published coefficients, or the ones
    ``dtc cache fit`` stores in the artifact)."""

    @model_validator(mode="before")
    @classmethod
    def _first_block_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "first_block" and "max_consecutive_skips" not in data:
            return {**data, "max_consecutive_skips": 2}
        return data

    @model_validator(mode="after")
    def _fits_mode(self) -> CacheSpec:
        if self.mode == "static":
            self._check_static()
        else:
            self._check_dynamic()
        return self

    def _check_static(self) -> None:
        if self.groups is None:
            raise ValueError("mode static needs groups: a list of {name, blocks, rule}")
        if self.steps is None:
            raise ValueError("mode static needs steps: the num_inference_steps the step rules are written for")
        for key, modes in _DYNAMIC_KEYS.items():
            if getattr(self, key) is not None:
                raise ValueError(f"{key} applies to mode {' or '.join(modes)} only; remove it or set mode: {modes[0]}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate group name in {names}")
        for i, g in enumerate(self.groups):
            last = g.last_step_named()
            if last is not None and last >= self.steps:
                raise _item_error(
                    i,
                    f"step {last} of group '{g.name}' ({g.describe()}) is outside the schedule of {self.steps} "
                    f"steps (0..{self.steps - 1}); use steps below {self.steps} or raise cache.steps",
                    "groups",
                )

    def _check_dynamic(self) -> None:
        if self.threshold is None:
            raise ValueError(
                f"mode {self.mode} needs threshold: the relative L1 change below which blocks are skipped "
                f"(e.g. {0.1 if self.mode == 'first_block' else 0.2})"
            )
        for key in ("steps", "groups"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key} applies to mode static only; remove it or set mode: static")
        for key, modes in _DYNAMIC_KEYS.items():
            if self.mode not in modes and getattr(self, key) is not None:
                raise ValueError(f"{key} applies to mode {' or '.join(modes)} only; remove it or set mode: {modes[0]}")
        if self.coefficients is not None and not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError(f"coefficients {self.coefficients}: every coefficient must be a finite number")

    def check_run_steps(self, num_steps: int) -> None:
        """Refuse a run whose schedule is shorter than a step the static rules name (UnsupportedError)."""
        for g in self.groups or []:
            last = g.last_step_named()
            if last is not None and last >= num_steps:
                raise UnsupportedError(
                    f"cache group '{g.name}' ({g.describe()}) names step {last} but this run has {num_steps} steps "
                    f"(0..{num_steps - 1}); run with --steps {self.steps} (the schedule the cache rules are written "
                    f"for) or --cache off"
                )

    def predicted_skips(self, segments: list[Segment], num_steps: int, fresh: tuple[int, ...] = ()) -> int:
        """Block evaluations a static run of ``num_steps`` skips (one transformer call per step).

        ``fresh``: the steps where another expert takes over (Wan2.2's low-noise expert): that expert has no
        residual of its own yet, so it computes every block there whatever the rules say.
        """
        groups = {g.name: g for g in self.groups or []}
        return sum(
            len(s.blocks) * len([n for n in groups[s.group].cached_steps(num_steps) if n not in fresh])
            for s in segments
            if s.group
        )


# --- blocks and segments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A run of consecutive blocks exported as one graph; ``group`` is its cache group (static mode) or None."""

    index: int
    blocks: tuple[str, ...]
    group: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "blocks": list(self.blocks), "group": self.group}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        return cls(int(data["index"]), tuple(data["blocks"]), data.get("group"))


def summarize_blocks(names: list[str] | tuple[str, ...]) -> str:
    """``transformer_blocks.0-18, single_transformer_blocks.0-37`` for a list of block names."""
    runs: list[tuple[str, int, int]] = []
    for name in names:
        prefix, _, idx = name.rpartition(".")
        i = int(idx)
        if runs and runs[-1][0] == prefix and runs[-1][2] == i - 1:
            runs[-1] = (prefix, runs[-1][1], i)
        else:
            runs.append((prefix, i, i))
    return ", ".join(f"{p}.{a}" if a == b else f"{p}.{a}-{b}" for p, a, b in runs)


def plan_segments(spec: CacheSpec, names: list[str]) -> list[Segment]:
    """Cut ``names`` into segments; RecipeError when a pattern matches no block or a block is in two groups."""
    if len(names) < 2:
        raise RecipeError(f"cache: the transformer has {len(names)} block(s); caching needs at least 2")
    if spec.mode == "first_block":
        return [Segment(0, (names[0],)), Segment(1, tuple(names[1:]))]
    if spec.mode == "teacache":  # every block is skipped together: one segment
        return [Segment(0, tuple(names))]
    owner: dict[str, str] = {}
    for gi, group in enumerate(spec.groups or []):
        for pi, pattern in enumerate(group.blocks):
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                raise RecipeError(
                    f"cache.groups[{gi}].blocks[{pi}]: pattern '{pattern}' matches no block of the transformer "
                    f"(it has {summarize_blocks(names)}); patterns are globs on block names, e.g. '{names[-1].rpartition('.')[0]}.*'"
                )
            for n in matched:
                if owner.get(n, group.name) != group.name:
                    raise RecipeError(
                        f"cache.groups[{gi}].blocks[{pi}]: block {n} is already in group '{owner[n]}'; "
                        "a block can belong to one cache group only"
                    )
                owner[n] = group.name
    segments: list[Segment] = []
    run: list[str] = []
    for name in names:
        if run and owner.get(run[-1]) != owner.get(name):
            segments.append(Segment(len(segments), tuple(run), owner.get(run[-1])))
            run = []
        run.append(name)
    segments.append(Segment(len(segments), tuple(run), owner.get(run[-1])))
    return segments


def plan_lines(spec: CacheSpec, segments: dict[str, list[Segment]]) -> list[str]:
    """Dry-run lines: the mode and, per denoiser (Wan2.2: both experts), each segment with its rule."""
    groups = {g.name: g for g in spec.groups or []}
    if spec.mode == "first_block":
        head = f"cache first_block: threshold {spec.threshold}, at most {spec.max_consecutive_skips} consecutive skips"
    elif spec.mode == "teacache":
        head = (
            f"cache teacache: threshold {spec.threshold}, the first {spec.retention or 1} step(s) and the last always "
            "computed; coefficients "
            + ("from the recipe" if spec.coefficients else "published for the family (or fitted: dtc cache fit)")
        )
    else:
        head = f"cache static: rules written for {spec.steps} steps"
    several = len(segments) > 1
    out = [head]
    if several:
        out.append(
            f"  {len(segments)} denoisers ({', '.join(segments)}), switched by the pipeline: each is split and keeps "
            "its own cache state; its first call after a switch computes every block"
            + ("; rules count the pipeline's steps" if spec.mode == "static" else "")
        )
    for name, segs in segments.items():
        indent = "    " if several else "  "
        if several:
            out.append(f"  {name}:")
        out.append(f"{indent}graphs: prologue, {len(segs)} block segment(s), epilogue")
        for s in segs:
            if spec.mode == "teacache":
                what = "skipped while the rescaled signal's accumulated change is below the threshold"
            elif spec.mode == "first_block":
                what = (
                    "first block (always computed)" if s.index == 0 else "skipped when the first block barely changes"
                )
            elif s.group:
                what = f"group {s.group}: {groups[s.group].describe(spec.steps)}"
            else:
                what = "always computed"
            out.append(f"{indent}segment {s.index}: {summarize_blocks(s.blocks)}  {what}")
    return out


def _changes(values: list[float | None]) -> str:
    return "[" + ", ".join("-" if c is None else f"{c:.3f}" for c in values) + "]"


def stats_line(stats: dict[str, Any]) -> str:
    """The run report of ``CachedEngineModule.cache_stats()``: one line, plus one line per expert when the
    pipeline switches between several (Wan2.2), each with its own skip count and first-block changes."""
    done, skipped = stats["blocks_evaluated"], stats["blocks_skipped"]
    total = done + skipped
    line = (
        f"cache {stats['mode']}: {done} of {total} block evaluations run, {skipped} skipped "
        f"({100 * stats['skipped_fraction']:.1f}%) over {stats['calls']} transformer calls"
    )
    if stats["mode"] == "off":
        return line
    first_block = stats.get("threshold") is not None
    if stats["mode"] == "teacache":
        line += f"; threshold {stats['threshold']}, signal change per call {_changes(stats['rel_change'])}"
    elif first_block:
        line += f"; threshold {stats['threshold']}, at most {stats['max_consecutive_skips']} consecutive skips"
        line += f"; first-block change per call {_changes(stats['rel_change'])}"
    line += f"; cached calls {stats['cached_calls']}"
    experts = stats.get("experts") or {}
    if len(experts) < 2:
        return line
    for name, e in experts.items():
        steps = e["steps"]
        contiguous = steps == list(range(steps[0], steps[-1] + 1)) if steps else False
        span = f"steps {steps[0]}-{steps[-1]}" if contiguous else f"steps {steps}"
        line += (
            f"\n  {name} ({span}, {len(e['calls'])} calls): {e['blocks_skipped']} of "
            f"{e['blocks_evaluated'] + e['blocks_skipped']} block evaluations skipped; cached calls {e['cached_calls']}"
        )
        if first_block:
            line += f"; {'signal' if stats['mode'] == 'teacache' else 'first-block'} change per call " + _changes(
                e["rel_change"]
            )
    return line
