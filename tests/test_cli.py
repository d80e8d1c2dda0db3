"""The CLI stays instant: no heavy module is imported for --help."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "tensorrt", "tensorrt_rtx", "modelopt", "onnx", "onnxruntime", "transformers",
         "fastapi", "uvicorn", "ray")  # fmt: skip
COMMANDS = ["", "build", "run", "inspect", "models", "publish", "pull", "refit", "bench", "serve"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_imports_nothing_heavy(cmd: str) -> None:
    code = (
        "import sys, json\n"
        "from dtcompile.cli import main\n"
        f"args = {[c for c in [cmd] if c] + ['--help']!r}\n"
        "try:\n    main(args)\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert "Usage:" in out
    assert not [m for m in HEAVY if m in loaded]


def test_unknown_command_exits_nonzero() -> None:
    r = subprocess.run([sys.executable, "-m", "dtcompile", "frobnicate"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "No such command" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "x"], "error: Missing option '--prompt'. (see: dtc run --help)"),
        (["run", "x", "--prompt", "p", "--steps", "0"], "error: Invalid value for '--steps'"),
        (["serve"], "error: Missing argument 'ARTIFACTS...'. (see: dtc serve --help)"),
        (["frobnicate"], "error: No such command 'frobnicate'."),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "dtcompile", *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr


def test_models_lists_families_builtins_and_their_recipes() -> None:
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "dtcompile", "models"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert re.search(r"sd3 +StableDiffusion3Pipeline", r.stdout) and re.search(r"flux +FluxPipeline", r.stdout)
    assert re.search(r"wan +WanPipeline  components: transformer", r.stdout)
    assert re.search(r"flux-kontext +FluxKontextPipeline", r.stdout) and "recipes/tiny-wan22.yaml" in r.stdout
    assert "builtin:tiny-sd3" in r.stdout and "recipes/tiny-sd3.yaml" in r.stdout
