"""Ulysses sequence parallel on the CPU (gloo, fp32): tiny Wan2.1 and tiny FLUX split over two ranks against one
rank's engine run, every denoiser call; the 2 x 2 world with CFG parallel (4 ranks); the bytes each rank sends
per step against the formula from the shapes; a rank that dies; the refusals.

Spawning ranks costs ~10-15 s of imports each on this 2-core machine, so the 2-rank checks of both families share
one spawn (``_both_families``) and the 4-rank check (marked slow) runs one 2-step request at the smallest size."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import DtcError, UnsupportedError
from tests.fixtures.builds import ORT_ONLY, build_recipe

PROMPT, NEGATIVE = "a cat playing piano", "blurry"
WAN_RUN = {"steps": 2, "seed": 1, "guidance": 5.0, "negative_prompt": NEGATIVE, "frames": 5, "height": 32,
           "width": 32}  # fmt: skip
FLUX_RUN = {"steps": 2, "seed": 1, "height": 32, "width": 64}


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-wan21.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-flux.yaml", *ORT_ONLY)


def _generate(artifact: Path, run: dict[str, Any], spec: Any) -> Any:
    from dtcompile.runtime.session import Session

    session = Session(artifact, "onnxruntime", parallel=spec, threads=1)
    out = session.generate(session.request(PROMPT, **run), trace=True)
    return dataclasses.replace(out, engine_module=None)


def _both_families(wan: Path, flux: Path, rank: int) -> tuple[Any, Any]:
    """One rank's Wan and FLUX generations (run on every rank of one spawn)."""
    from dtcompile.runtime.parallel import ParallelSpec

    spec = ParallelSpec(ulysses=2)
    return _generate(wan, WAN_RUN, spec), _generate(flux, FLUX_RUN, spec)


def _expected_bytes(tokens: int, calls: int, width: int, out_tokens: int, out_width: int, p: int = 2) -> int:
    """Per denoiser call and rank, written out from the shapes (docs/parallel.md): 4 all-to-alls (q, k, v,
    output) per attention of the rank's tokens/P x width float32 values, (P-1)/P of each leaving the rank, and
    the gather of the rank's out_tokens/P x out_width projected values to P-1 ranks."""
    local = tokens // p * width * 4
    return calls * 4 * local * (p - 1) // p + out_tokens // p * out_width * 4 * (p - 1)


def test_two_ranks_equal_one_rank_at_every_call_and_send_the_predicted_bytes(wan21: Path, flux: Path) -> None:
    import functools

    import numpy as np

    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.parallel import ParallelSpec, run_parallel
    from dtcompile.runtime.session import run_artifact

    wan2, flux2 = run_parallel(ParallelSpec(ulysses=2), functools.partial(_both_families, wan21, flux), threads=1)
    for artifact, run, got in ((wan21, WAN_RUN, wan2), (flux, FLUX_RUN, flux2)):
        one = run_artifact(artifact, PROMPT, backend="onnxruntime", threads=1, trace=True, **run)
        assert len(got.trace) == len(one.trace) == (4 if artifact == wan21 else 2)  # Wan: cond + uncond per step
        for call, (a, b) in enumerate(zip(got.trace, one.trace, strict=True)):
            assert rel_l2(a, b) <= 1e-5, f"{artifact.name} call {call}: {rel_l2(a, b)}"
        assert got.backend == "torch" and got.parallel is not None and got.parallel["ulysses"] == 2
        assert np.abs(np.asarray(got.image, dtype=np.int16) - np.asarray(one.image, dtype=np.int16)).max() <= 1
    # tiny Wan2.1 (hidden 32 = 2 heads x 16, 2 blocks, patch 1x2x2, 16 channels), 5 frames 32x32: 2 latent frames
    # x 2 x 2 patches = 8 tokens; cond + uncond: 2 calls per step
    wan_call = _expected_bytes(tokens=8, calls=2, width=32, out_tokens=8, out_width=16 * 4)
    assert wan_call == 2048 + 1024
    assert wan2.parallel["ulysses_bytes_per_step"] == wan2.parallel["ulysses_predicted_bytes_per_step"] == 2 * wan_call
    # tiny FLUX (hidden 64 = 4 heads x 16, 2 double + 2 single blocks, 16 packed channels, VAE factor 2), 32x64:
    # 8 x 16 = 128 image tokens + 32 text tokens; guidance-distilled: 1 call per step
    flux_call = _expected_bytes(tokens=160, calls=4, width=64, out_tokens=128, out_width=16)
    assert flux2.parallel["ulysses_bytes_per_step"] == flux2.parallel["ulysses_predicted_bytes_per_step"] == flux_call


@pytest.mark.slow  # 4 spawned ranks: ~90 s on a 2-core machine shared with other work
def test_cfg_2_by_ulysses_2_on_four_ranks(wan21: Path) -> None:
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import run_artifact, run_artifact_parallel

    run = {**WAN_RUN, "backend": "onnxruntime", "threads": 1, "trace": True}
    one = run_artifact(wan21, PROMPT, **run)
    four = run_artifact_parallel(wan21, ParallelSpec(cfg=2, ulysses=2), PROMPT, **run)
    assert len(four.trace) == len(one.trace) == 4
    for call, (a, b) in enumerate(zip(four.trace, one.trace, strict=True)):
        assert rel_l2(a, b) <= 1e-5, f"call {call}"
    p = four.parallel
    assert p is not None and (p["ranks"], p["cfg"], p["ulysses"], p["split"]) == (4, 2, 2, "sequential")
    # one Ulysses call per step on each rank (its own branch), then the CFG gather sends its branch's whole output
    # (16 channels x 2 latent frames x 4 x 4, float32) to the other CFG rank of its sequence position
    wan_call = _expected_bytes(tokens=8, calls=2, width=32, out_tokens=8, out_width=16 * 4)
    assert p["ulysses_bytes_per_step"] == p["ulysses_predicted_bytes_per_step"] == wan_call
    assert p["bytes_sent_per_step"] == wan_call + 16 * 2 * 4 * 4 * 4


def test_a_rank_that_dies_ends_the_run_in_one_line(wan21: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtcompile.runtime.parallel import FAULT_ENV, ParallelSpec
    from dtcompile.runtime.session import run_artifact_parallel

    monkeypatch.setenv(
        FAULT_ENV, "1:1"
    )  # rank 1 exits at its second denoiser call, while rank 0 waits in an all-to-all
    with pytest.raises(DtcError) as info:
        run_artifact_parallel(wan21, ParallelSpec(ulysses=2), PROMPT, backend="onnxruntime", threads=1, timeout_s=60,
                              **WAN_RUN)  # fmt: skip
    assert str(info.value) == "parallel 2 ranks: rank 1 exited with code 3 during the request; every rank was stopped"


def test_refusals(wan21: Path) -> None:
    from dtcompile.models.sd3 import SD3Adapter
    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import Session
    from dtcompile.runtime.ulysses import check_ulysses

    assert ParallelSpec.parse("cfg=2,ulysses=2") == ParallelSpec(cfg=2, ulysses=2)
    assert ParallelSpec.parse("ulysses=4").world == 4
    with pytest.raises(UnsupportedError, match="ulysses counts the ranks"):
        ParallelSpec.parse("ulysses=0")
    # tiny Wan2.1 has 2 heads
    with pytest.raises(UnsupportedError, match="transformer has 2 attention heads, which do not split over 4 ranks"):
        Session(wan21, "onnxruntime", parallel=ParallelSpec(ulysses=4))
    session = Session(wan21, "onnxruntime", parallel=ParallelSpec(ulysses=2))
    with pytest.raises(UnsupportedError, match=r"48x48 x 9 frames makes 27 tokens, which do not split over 2 ranks"):
        session.request(PROMPT, steps=2, frames=9, height=48, width=48)  # 3 latent frames x 3 x 3 patches
    with pytest.raises(UnsupportedError, match="StableDiffusion3Pipeline artifacts have no sequence-parallel form"):
        check_ulysses(session.manifest, SD3Adapter(), 2, "StableDiffusion3Pipeline")


@pytest.mark.slow  # spawns 2 ranks and runs three settings: ~60 s here
def test_dtc_bench_ulysses_reports_latency_and_bytes_next_to_the_prediction(wan21: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from dtcompile.cli import cli

    out = tmp_path / "ulysses.json"
    r = CliRunner().invoke(cli, ["bench", str(wan21), "--parallel", "ulysses=2", "--steps", "3", "--repeat", "1",
                                 "--threads", "1", "--backend", "onnxruntime", "--frames", "5", "--height", "32",
                                 "--width", "32", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["ranks_backend"] == "torch" and report["steps_timed"] == [2, 2]
    assert report["ulysses_bytes_per_rank_per_step"] == report["ulysses_predicted_bytes_per_rank_per_step"] == 6144
    assert report["ratio_to_torch"] == report["ranks_step_ms_median"] / report["one_rank_torch_step_ms_median"]
    assert "predicted from the shapes 6144" in r.output


TORCHRUN_SCRIPT = """
import sys
import numpy as np
import torch
import dtcompile

pipe = dtcompile.load_pipeline(sys.argv[1], backend="onnxruntime", parallel="ulysses=2")
image = pipe("a cat playing piano", num_inference_steps=2, height=32, width=64,
             generator=torch.Generator("cpu").manual_seed(2)).images[0]
if torch.distributed.get_rank() == 0:
    np.save(sys.argv[2], np.asarray(image))
"""


@pytest.mark.slow  # two torchrun ranks: ~60 s here
def test_load_pipeline_ulysses_under_torchrun(flux: Path, tmp_path: Path) -> None:
    """A diffusers user's own script under ``torchrun --nproc-per-node 2`` with ``parallel="ulysses=2"``: rank 0's
    image equals the one-rank engine pipeline's (to 1 in a pixel value)."""
    import subprocess
    import sys

    import numpy as np
    import torch

    import dtcompile

    script, out = tmp_path / "user.py", tmp_path / "image.npy"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, str(script), str(flux), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = dtcompile.load_pipeline(flux, backend="onnxruntime")
    ref = pipe(PROMPT, num_inference_steps=2, height=32, width=64, generator=torch.Generator("cpu").manual_seed(2))
    assert np.abs(np.load(out).astype(np.int16) - np.asarray(ref.images[0], dtype=np.int16)).max() <= 1


@pytest.mark.slow  # exports three graphs and spawns 2 ranks: ~60 s here
def test_engine_form_prototype_matches_the_torch_block() -> None:
    """tools/ulysses_engine.py on tiny Wan2.1's first block: the block as one engine, split into pre/post engines
    on one rank, and split over two ranks with the all-to-alls, all equal the torch block; bytes per block are
    4 all-to-alls of the rank's q/k/v/output (8 tokens, 32 wide, float32: 4 x 1/2 x 4 x 32 x 4)."""
    from dtcompile.tools.ulysses_engine import prototype

    report = prototype("builtin:tiny-wan21", frames=5, height=32, width=32, text_len=32, repeat=1)
    assert report["tokens"] == 8 and report["heads"] == 2
    assert all(v <= 1e-5 for v in report["rel_l2_to_torch"].values()), report["rel_l2_to_torch"]
    assert report["bytes_per_rank_per_block"] == 4 * (4 * 32 * 4) // 2 == 1024


@pytest.mark.slow  # a server and its follower rank: ~60 s here
def test_dtc_serve_ulysses_answers_what_dtc_run_makes(flux: Path, tmp_path: Path) -> None:
    """``dtc serve --parallel ulysses=2``: the server process is rank 0 and spawns rank 1, which holds the other
    half of every request's tokens; the image equals the one-rank run's (to 1 in a pixel value) and SIGTERM ends
    both ranks."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from dtcompile.runtime.session import run_artifact
    from tests.serve.test_server import client, serving

    ref = run_artifact(flux, PROMPT, steps=2, seed=3, height=32, width=64, backend="onnxruntime").image
    with serving(flux, tmp_path, "--parallel", "ulysses=2", "--backend", "onnxruntime", "--default-steps", "2",
                 env={"DTC_TEST_KEY": "k"}) as server:  # fmt: skip
        got = client(server, "k").images.generate(model="tiny-flux", prompt=PROMPT, size="64x32",
                                                  response_format="b64_json", extra_body={"seed": 3})  # fmt: skip
        image = Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json or ""))).convert("RGB")
        assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1
        proc = server.proc
    assert proc.returncode == 0


@pytest.mark.slow  # its own 2-rank spawn: ~60 s here
def test_wan22_both_experts_split_over_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny Wan2.2 (two experts, switched at the boundary): both experts load from the source and split; every
    call of 4 steps within 1e-5 of the one-rank engine run."""
    from dtcompile.core.metrics import rel_l2
    from dtcompile.runtime.parallel import ParallelSpec
    from dtcompile.runtime.session import run_artifact, run_artifact_parallel

    wan22 = build_recipe(tmp_path_factory, "tiny-wan22.yaml", *ORT_ONLY)
    run = {**WAN_RUN, "steps": 4, "backend": "onnxruntime", "threads": 1, "trace": True}
    one = run_artifact(wan22, PROMPT, **run)
    two = run_artifact_parallel(wan22, ParallelSpec(ulysses=2), PROMPT, **run)
    assert len(two.trace) == len(one.trace) == 8
    for call, (a, b) in enumerate(zip(two.trace, one.trace, strict=True)):
        assert rel_l2(a, b) <= 1e-5, f"call {call}"
    assert two.parallel is not None and two.parallel["ulysses_bytes_per_step"] == 6144
