"""CFG parallel on the CPU: two gloo ranks, each running one guidance branch of the same request, against one
rank (tiny SD3: a batched CFG call; tiny Wan2.1: a "cond" and an "uncond" call), and the failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtcompile.core.errors import DtcError, UnsupportedError
from tests.fixtures.builds import ORT_ONLY, build_recipe

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE = "a cat playing piano", "blurry"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-sd3.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-wan21.yaml", *ORT_ONLY)


RUNS = {
    "sd3": {"steps": 4, "seed": 1, "guidance": 5.0, "negative_prompt": NEGATIVE},
    "wan21": {
        "steps": 4,
        "seed": 1,
        "guidance": 5.0,
        "negative_prompt": NEGATIVE,
        "frames": 9,
        "height": 48,
        "width": 64,
    },  # fmt: skip
}


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_two_ranks_equal_one_rank_at_every_call(family: str, request: pytest.FixtureRequest) -> None:
    import numpy as np

    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import run_artifact, run_artifact_parallel

    artifact = request.getfixturevalue(family)
    kw = {**RUNS[family], "backend": "onnxruntime", "threads": 1, "trace": True}
    one = run_artifact(artifact, PROMPT, **kw)
    two = run_artifact_parallel(artifact, ParallelSpec(cfg=2), PROMPT, **kw)
    assert len(two.trace) == len(one.trace) == (4 if family == "sd3" else 8)
    for call, (got, ref) in enumerate(zip(two.trace, one.trace, strict=True)):
        assert rel_l2(got, ref) <= 1e-6, f"call {call}"
    # SD3's halves run at batch 1 instead of 2: the same values to float rounding, a pixel may round the other way
    got, ref = (np.asarray(x, dtype=np.int16) for x in (two.image, one.image))
    assert np.abs(got - ref).max() <= 1
    assert two.parallel is not None and two.parallel["ranks"] == 2
    # each step every rank sends its branch once: the denoiser output of one branch (float32)
    per_branch = one.trace[0].numel() * 4 // (2 if family == "sd3" else 1)
    assert two.parallel["bytes_sent_per_step"] == per_branch
    assert two.parallel["split"] == ("batched" if family == "sd3" else "sequential")


def test_a_rank_that_dies_ends_the_run_in_one_line(wan21: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtcompile.runtime.parallel import FAULT_ENV, ParallelSpec
    from dtcompile.runtime.session import run_artifact_parallel

    monkeypatch.setenv(FAULT_ENV, "1:2")  # rank 1 exits at its third denoiser call
    with pytest.raises(DtcError) as info:
        run_artifact_parallel(wan21, ParallelSpec(cfg=2), PROMPT, backend="onnxruntime", threads=1, timeout_s=60,
                              **RUNS["wan21"])  # fmt: skip
    assert str(info.value) == ("parallel 2 ranks: rank 1 exited with code 3 during the request; every rank was stopped")


def test_refusals(tiny_artifact: Path, sd3: Path) -> None:
    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import Session

    with pytest.raises(UnsupportedError, match="FluxPipeline artifacts have no classifier-free guidance branches"):
        Session(tiny_artifact, "onnxruntime", parallel=ParallelSpec(cfg=2))
    for text, message in [
        ("cfg=3", "cfg splits the two guidance branches"),
        ("ulysses=0", "ulysses counts the ranks one sequence is split over"),
        ("tp=2", "expected cfg=2"),
        ("cfg=1", "nothing to split"),
        ("cfg=2,cfg=2", "expected cfg=2"),
    ]:
        with pytest.raises(UnsupportedError, match=message):
            ParallelSpec.parse(text)
    with pytest.raises(UnsupportedError, match="was not started as one of several ranks"):
        Session(sd3, "onnxruntime", parallel=ParallelSpec(cfg=2)).load()


def test_dtc_bench_parallel_reports_both_latencies_and_bytes(wan21: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from dtcompile.cli import cli

    out = tmp_path / "parallel.json"
    r = CliRunner().invoke(cli, ["bench", str(wan21), "--parallel", "cfg=2", "--steps", "3", "--repeat", "1",
                                 "--threads", "1", "--backend", "onnxruntime", "--frames", "9", "--height", "48",
                                 "--width", "64", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["parallel"]["ranks"] == 2 and report["steps_timed"] == [2, 2]  # 3 steps: 2 gaps per run
    assert report["bytes_sent_per_rank_per_step"] == 9216  # one branch output per step: 16 x 3 x 6 x 8 float32
    assert report["ratio"] == report["ranks_step_ms_median"] / report["one_rank_step_ms_median"]
    assert "bytes sent per rank per step" in r.output


def test_dtc_serve_parallel_answers_what_dtc_run_makes(sd3: Path, tmp_path: Path) -> None:
    """``dtc serve --parallel cfg=2``: the server process is rank 0 and spawns rank 1, which runs every request's
    other guidance branch; the image equals ``dtc run``'s (to SD3's batch-split rounding) and SIGTERM ends both."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from dtcompile.runtime.session import run_artifact
    from tests.serve.test_server import client, serving

    ref = np.asarray(run_artifact(sd3, PROMPT, steps=4, seed=3, backend="onnxruntime").image, dtype=np.int16)
    with serving(sd3, tmp_path, "--parallel", "cfg=2", "--backend", "onnxruntime", "--default-steps", "4",
                 env={"DTC_TEST_KEY": "k"}) as server:  # fmt: skip
        got = client(server, "k").images.generate(model="tiny-sd3", prompt=PROMPT, size="64x64",
                                                  response_format="b64_json", extra_body={"seed": 3})  # fmt: skip
        image = Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json or ""))).convert("RGB")
        assert np.abs(np.asarray(image, dtype=np.int16) - ref).max() <= 1
        proc = server.proc
    assert proc.returncode == 0  # stopped by SIGTERM within the fixture's limit, followers included


TORCHRUN_SCRIPT = """
import sys
import numpy as np
import torch
import dtcompile

pipe = dtcompile.load_pipeline(sys.argv[1], backend="onnxruntime", parallel="cfg=2")
image = pipe("a cat playing piano", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
             generator=torch.Generator("cpu").manual_seed(2)).images[0]
if torch.distributed.get_rank() == 0:
    np.save(sys.argv[2], np.asarray(image))
"""


def test_load_pipeline_parallel_under_torchrun(sd3: Path, tmp_path: Path) -> None:
    """A diffusers user's own script under ``torchrun --nproc-per-node 2``: ``load_pipeline(parallel="cfg=2")``
    on each rank, the same call on both; rank 0's image equals the one-rank pipeline's."""
    import subprocess
    import sys

    import numpy as np
    import torch

    import dtcompile

    script, out = tmp_path / "user.py", tmp_path / "image.npy"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, str(script), str(sd3), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = dtcompile.load_pipeline(sd3, backend="onnxruntime")
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(2)).images[0]  # fmt: skip
    assert np.abs(np.load(out).astype(np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1
