"""The build, as one ordered list of stages: load -> lora -> quantize -> export -> build.

Each ``Stage`` (``dtcompile.stages.steps``) names its step, bound to the step function itself, what it produces
and when it applies. ``dtcompile.stages.plan.make_plan`` is the dry run; ``dtcompile.stages.runner.run_build``
executes the plan. Importing this package loads nothing heavy (``dtc build --help`` uses it).
"""

from __future__ import annotations

from dtcompile.stages.steps import STAGE_NAMES, STAGES, Stage

__all__ = ["STAGES", "STAGE_NAMES", "Stage"]
