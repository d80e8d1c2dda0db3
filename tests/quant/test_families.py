"""int8, nvfp4 and svdquant on the other families' tiny built-ins (fp8 has its own test per family): each
build calibrates on the family's own pipeline runs, exports Q/DQ (or FP4) graphs, builds the engines its
format allows and records accuracy (a) and, where onnxruntime runs the graph, parity (b)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST = ["quant.calib.size=2", "quant.calib.batch=2", "quant.calib.steps=2", "quant.accuracy.prompts=1",
        "quant.accuracy.steps=2"]  # fmt: skip
FORMATS = {  # quant section, engine section, engines expected
    "int8": ("{format: int8, alpha: 0.8, calib: {prompts: builtin}}",
             "{backends: [onnxruntime, tensorrt-rtx], targets: [sm_89]}", {"onnxruntime:any", "tensorrt-rtx:sm_89"}),
    "nvfp4": ("{format: nvfp4, calib: {prompts: builtin}}",
              "{backends: [onnxruntime, tensorrt-rtx], targets: [sm_120]}", {"tensorrt-rtx:sm_120"}),
    "svdquant": ("{format: svdquant, rank: 8, calib: {prompts: builtin}}",
                 "{backends: [tensorrt-rtx], targets: [sm_120]}", {"tensorrt-rtx:sm_120"}),
}  # fmt: skip
FAMILIES = {
    "sd3": "tiny-sd3.yaml",
    "kontext": "tiny-flux-kontext.yaml",
    "wan": "tiny-wan21.yaml",
    "flux2": "tiny-flux2.yaml",
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_family_build(family: str, fmt: str, tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    quant, engine, want = FORMATS[fmt]
    recipe = load_recipe(
        ROOT / "recipes" / FAMILIES[family], [f"output.dir={tmp_path}", f"quant={quant}", f"engine={engine}", *FAST]
    )
    comp = run_build(recipe).manifest.component("transformer")
    assert {e.target for e in comp.engines} == want
    q = comp.quant
    assert q["format"] == fmt
    assert 0.98 < q["accuracy"]["summary"]["min_cos"] <= 1.0  # quantized vs unquantized, teacher-forced
    assert q["parity"]["summary"]["max_rel_err"] <= q["parity"]["gate"]  # graph vs fake-quant torch
    graph = q["graph"]
    if fmt == "int8":
        assert graph["int8_qdq"] > 0 and graph["custom_ops"] == {}
    else:
        assert graph["fp4_weights"] > 0 and graph["onnxruntime_runnable"] is False
