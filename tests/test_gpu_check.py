"""scripts/gpu_check.py's plumbing on the CPU: the no-GPU refusal, ``--allow-no-gpu``, the summary table and the
JSON report, failures recorded without stopping the check, and the ``--set`` overrides its builds use (dry runs).
The phases themselves need a GPU (docs/gpu-check.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtcompile.core.targets import gpu_arch, trt_flavour_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
NO_GPU = gpu_arch() is None


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the script is being executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal shown without a CUDA GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_fails(tmp_path: Path) -> None:
    r = _script("--json", str(tmp_path / "r.json"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpu_check: no CUDA GPU found (")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not NO_GPU, reason="checks the all-SKIP run without a CUDA GPU")
def test_allow_no_gpu_skips_every_phase_with_a_table_and_a_json_report(gc, tmp_path: Path) -> None:
    r = _script("--allow-no-gpu", "--quick", "--json", str(tmp_path / "r.json"), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "dtc-gpu-check/1" and report["passed"] is True
    assert [(p["name"], p["group"]) for p in report["phases"]] == gc.phase_names()
    assert {p["status"] for p in report["phases"]} == {"SKIP"}
    assert all(p["reason"] == "no CUDA GPU (--allow-no-gpu)" for p in report["phases"])
    assert report["counts"] == {"PASS": 0, "FAIL": 0, "SKIP": len(gc.phase_names())}
    env = report["environment"]
    assert env["arch"] is None and env["flavour"] is None and env["torch"]["cuda_available"] is False
    assert set(env["tensorrt"]) == {"tensorrt", "tensorrt-rtx"} and "nvidia_smi" in env and "dtcompile" in env
    assert set(report["phases"][0]) == {"name", "group", "status", "seconds", "figure", "reason", "details"}

    table = r.stdout[r.stdout.index("| phase") :].splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["phase", "status", "seconds", "key figure / reason"]
    rows = [line for line in table[2:] if line.startswith("| ")]
    assert len(rows) == len(gc.phase_names())
    assert all(row.split("|")[2].strip() == "SKIP" for row in rows)
    assert f"0 PASS, 0 FAIL, {len(rows)} SKIP in " in r.stdout


def _fake_env(arch: str, flavour: str | None, reason: str | None = None) -> dict:
    env = {"arch": arch, "flavour": flavour, "device": "Fake GPU", "nvidia_smi": {"driver": "999.1"}}
    env |= {"torch": {"version": "2.x", "cuda": "13.0"}, "tensorrt": {flavour: {"version": "1.7"}} if flavour else {}}
    return env | ({"flavour_reason": reason} if reason else {})


def test_failures_are_recorded_and_the_check_goes_on(gc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build(recipe, out_dir, flavour, arch, logs, *extra):
        if recipe == "tiny-sd3":
            raise gc.Fail("exit 1: BuildError: boom")
        return gc.Done(f"built {recipe} {' '.join(extra)}".strip(), value=out_dir)

    def refit(*_):
        raise RuntimeError("refit crashed\nsecond line")

    monkeypatch.setattr(gc, "build_phase", build)
    monkeypatch.setattr(gc, "parity_phase", lambda art, *a, **k: gc.Done(f"parity of {art.name}"))
    monkeypatch.setattr(gc, "refit_phase", refit)
    monkeypatch.setattr(gc, "tests_phase", lambda *a: (_ for _ in ()).throw(gc.Skip("no tests/ folder")))
    args = gc.parse_args(["--quick"])
    check = gc.run_check(args, _fake_env("sm_86", "tensorrt-rtx"), tmp_path / "r.json", tmp_path)
    by = {r.name: r for r in check.results}
    assert [(r.name, r.group) for r in check.results] == gc.phase_names()
    assert by["environment"].status == "PASS" and by["environment"].figure.startswith("sm_86 Fake GPU, driver 999.1")
    assert (by["build tiny-sd3"].status, by["build tiny-sd3"].reason) == ("FAIL", "exit 1: BuildError: boom")
    assert (by["parity tiny-sd3"].status, by["parity tiny-sd3"].reason) == ("SKIP", "build tiny-sd3 did not pass")
    assert by["build tiny-flux-fp8"].reason == "needs sm_89 or newer (this GPU is sm_86)"
    assert (by["parity tiny-flux"].status, by["parity tiny-flux"].figure) == ("PASS", "parity of tiny-flux")
    assert by["build tiny-flux refittable"].figure == f"built tiny-flux {gc.REFITTABLE}"
    assert (by["refit"].status, by["refit"].reason) == ("FAIL", "RuntimeError: refit crashed")
    assert any("RuntimeError: refit crashed" in line for line in by["refit"].details["traceback"])
    assert (by["gpu tests"].status, by["gpu tests"].reason) == ("SKIP", "no tests/ folder")
    assert {by[f"build {gc.REALWIDTH}"].reason, by[f"bench {gc.REALWIDTH}"].reason} == {"--quick"}

    report = json.loads((tmp_path / "r.json").read_text())  # rewritten after every phase
    assert report["passed"] is False and report["counts"]["FAIL"] == 2
    assert len(report["phases"]) == len(gc.phase_names())
    table = gc.summary_table(report)
    assert "| build tiny-sd3 " in table and "| FAIL   |" in table
    assert table.splitlines()[-1].startswith(f"{report['counts']['PASS']} PASS, 2 FAIL, ")


def test_no_flavour_for_this_gpu_fails_the_environment_and_skips_the_rest(gc, tmp_path: Path) -> None:
    reason = "tensorrt targets sm_90 but is not importable here (pip install 'dtcompile[trt]')"
    check = gc.run_check(gc.parse_args(["--skip", "tests"]), _fake_env("sm_90", None, reason), None, tmp_path)
    by = {r.name: r for r in check.results}
    assert (by["environment"].status, by["environment"].reason) == ("FAIL", reason)
    assert by["build tiny-flux"].reason == reason and by["refit"].reason == reason
    assert by["gpu tests"].reason == "--skip tests"
    assert not check.report()["passed"]


def test_flavour_per_arch() -> None:
    both = ["tensorrt", "tensorrt-rtx"]
    assert trt_flavour_for("sm_89", both) == "tensorrt-rtx"
    assert trt_flavour_for("sm_90", both) == "tensorrt"  # TensorRT-RTX has no Hopper target
    assert trt_flavour_for("sm_100", ["tensorrt-rtx"]) is None
    assert trt_flavour_for("sm_120", ["tensorrt"]) == "tensorrt"
    assert trt_flavour_for(None, both) is None


def test_bad_skip_group_is_refused(gc, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gc.parse_args(["--skip", "build,bogus"])
    assert "--skip bogus: unknown group; choose from build, parity, refit, tests, bench" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe", ["tiny-flux", "tiny-flux-fp8", "tiny-sd3-cache", "tiny-wan22-cache", "flux-realwidth"]
)
def test_build_overrides_plan_an_engine_for_the_local_arch(gc, recipe: str, tmp_path: Path) -> None:
    import dtcompile

    extra = (gc.LORA_FUSED,) if recipe == "tiny-flux" else ()
    plan = dtcompile.plan(
        ROOT / "recipes" / f"{recipe}.yaml", gc.recipe_overrides(tmp_path, "tensorrt-rtx", "sm_89", *extra)
    )
    assert [(t.backend, t.arch) for t in plan.buildable()] == [("onnxruntime", "any"), ("tensorrt-rtx", "sm_89")]
    assert plan.out_dir == tmp_path / recipe
    if extra:
        assert [(str(s.source), s.scale) for s in plan.recipe.lora] == [(str(gc.LORA), gc.LORA_SCALE)]


def test_the_shell_wrapper_and_make_target_call_the_script() -> None:
    sh = ROOT / "scripts" / "gpu_check.sh"
    assert sh.stat().st_mode & 0o111 and "gpu_check.py" in sh.read_text()
    assert "scripts/gpu_check.py" in (ROOT / "Makefile").read_text().split("\ngpu-check:")[1].split("\n\n")[0]


def test_parity_phase_runs_with_onnxruntime_standing_in_for_the_engine(gc, tiny_artifact: Path) -> None:
    """The parity phase's own code (per-engine feeds, traced runs, figure, tolerances) on the CPU: onnxruntime
    against itself, so every error is zero; on a GPU the first backend is the TensorRT flavour."""
    done = gc.parity_phase(tiny_artifact, "onnxruntime", "any", cached=False)
    assert done.figure == "1 engine(s) rel L2 <= 0.0e+00, 1 run(s): step rel L2 <= 0.0e+00, PSNR >= 100.0 dB"
    assert [(r["component"], r["output"], r["rel_l2"]) for r in done.details["engines"]] == [
        ("transformer", "latent", 0.0)
    ]
    assert done.details["runs"]["run"]["steps"] == [0.0] * 4
    assert done.details["tolerance"] == {"max_rel_l2": 1e-2, "min_psnr_db": 30.0}
    with pytest.raises(gc.Fail, match="no tensorrt-rtx sm_86 engine to compare"):
        gc.parity_phase(tiny_artifact, "tensorrt-rtx", "sm_86", cached=False)


def test_script_and_gpu_tests_build_with_the_same_overrides(gc, tmp_path: Path) -> None:
    """So that the gpu tests' builds into the script's folder ($DTC_GPU_CHECK_ENGINES) are up-to-date no-ops."""
    from tests.fixtures import gpu

    assert (gc.LORA_FUSED, gc.REFITTABLE, gc.LORA, gc.LORA_SCALE) == (
        gpu.LORA_FUSED,
        gpu.REFITTABLE,
        gpu.LORA,
        gpu.LORA_SCALE,
    )
    for flavour, arch in (("tensorrt-rtx", "sm_89"), ("tensorrt", "sm_90")):
        ours = gc.recipe_overrides(tmp_path / "tiny-flux", flavour, arch, gc.REFITTABLE)
        assert ours == [*gpu.gpu_overrides(tmp_path / "tiny-flux", flavour=flavour, arch=arch), gpu.REFITTABLE]
