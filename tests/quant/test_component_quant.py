"""A quant format per engine component: FLUX's T5 (``text_encoder_2``) in fp8 next to a float32 transformer.

recipes/tiny-flux-t5fp8.yaml is built once for real (onnxruntime and TensorRT-RTX sm_89/sm_120): the T5 is
calibrated by running it on the calibration prompts, exported with fp8 Q/DQ, checked against the fake-quant
encoder in float32 and measured against the unquantized one. The refusals of every other format/component
pair are one line each, and the artifact and calibration keys cover the component's quant settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dtcompile.core.errors import RecipeError, UnsupportedError, VerificationError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny-flux-t5fp8.yaml"
PROMPT = "a red fox in the snow"
T5 = "text_encoder_2"
#: q, k, v, o, wi_0 and wi_1 of both tiny T5 blocks: a weight and an input Q/DQ each (wo, the embedding and
#: the relative position bias stay float32).
T5_QDQ = 2 * 6 * 2


@pytest.fixture(scope="module")
def t5fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    out = tmp_path_factory.mktemp("engines-t5fp8")
    return run_build(load_recipe(RECIPE, [f"output.dir={out}"])).artifact_dir


def _t5(dtype: Any = None) -> Any:
    """The built-in tiny FLUX's T5 encoder, unquantized."""
    import torch
    from transformers import T5EncoderModel

    from dtcompile.models.builtin import builtin_model_path

    path = builtin_model_path("tiny-flux") / T5
    return T5EncoderModel.from_pretrained(path, dtype=dtype or torch.float32).eval()


def _fake_quant_t5(artifact: Path) -> Any:
    """The build's fake-quant T5: the unquantized one with the calibrated state the build saved restored."""
    from dtcompile.manifest import read_manifest
    from dtcompile.quant.calibration import load_state, quant_cache_dir

    key = read_manifest(artifact).component(T5).quant["calib"]["key"]
    return load_state(_t5(), quant_cache_dir() / key[:32] / "state.mto")


def _ids(prompts: list[str]) -> Any:
    from transformers import AutoTokenizer

    from dtcompile.models.builtin import builtin_model_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("tiny-flux") / "tokenizer_2")
    return tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids


def test_manifest_records_the_t5_quant_format_qdq_parity_and_effect(t5fp8: Path) -> None:
    import onnx

    from dtcompile.manifest import read_manifest

    m = read_manifest(t5fp8)
    t5 = m.component(T5)
    want = {("onnxruntime", "any"), ("tensorrt-rtx", "sm_89"), ("tensorrt-rtx", "sm_120")}
    assert {(e.backend, e.arch) for e in t5.engines} == want  # the fp8 T5 graph builds for both RTX arches
    assert m.component("transformer").quant is None and m.component("transformer").parity["rel_l2"] <= 1e-4
    q = t5.quant
    assert q["format"] == "fp8" and q["min_sm"] == 89 and q["spec"]["format"] == "fp8"
    assert q["exclude"] == ["shared", "*embed_tokens", "*relative_attention_bias", "*DenseReluDense.wo"]
    assert q["calib"]["n_prompts"] == 128 and q["spec"]["calib"]["prompts"] == "builtin"  # the schema's defaults
    # Q/DQ: standard ops, fp8 weights stored as fp8 initializers, nothing custom
    assert q["graph"]["fp8_qdq"] == T5_QDQ and q["enabled_quantizers"] == T5_QDQ
    assert q["graph"]["custom_ops"] == {} and q["graph"]["fp8_attention"] == 0
    graph = onnx.load(str(t5fp8 / t5.onnx.file))
    fp8 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2]
    assert len(fp8) == T5_QDQ // 2 and not any(".wo." in t.name for t in fp8)
    # parity (b): the graph in onnxruntime against the fake-quant encoder, float32 on both sides, per output
    parity = q["parity"]
    assert parity["outputs"] == ["last_hidden_state"] and parity["precision"] == "float32"
    assert parity["tolerance"] == 1e-3 and parity["summary"]["max_rel_err"] <= 1e-5
    # the model's own rounding noise (quantizer inputs perturbed by 1e-6) is small here: the gate is the tolerance
    assert parity["noise"]["perturbation"] == 1e-6 and parity["noise"]["max_rel_err"] < 5e-4
    assert parity["gate"] == 1e-3
    # the quantization effect: fake-quant against unquantized on the held-out prompts, recorded and sane
    effect = q["accuracy"]
    assert effect["prompts"] == 4 and effect["reference"] == "unquantized"
    assert 0.99 < effect["summary"]["min_cos"] < 1.0 and 1e-4 < effect["summary"]["max_rel_err"] < 0.2
    assert q["calibration_s"] > 0 and q["accuracy_s"] > 0


def test_run_makes_an_image_and_the_t5_engine_matches_the_fake_quant_encoder(t5fp8: Path) -> None:
    import torch

    from dtcompile.core.metrics import rel_l2
    from dtcompile.manifest import read_manifest
    from dtcompile.runtime.session import load_engine_pipeline, run_artifact

    assert run_artifact(t5fp8, PROMPT, steps=2, backend="onnxruntime").image.size == (64, 64)
    pipe, *_ = load_engine_pipeline(t5fp8, "onnxruntime")
    pipe.text_encoder_2.trace = []
    pipe(PROMPT, height=64, width=64, num_inference_steps=1, max_sequence_length=32,
         generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip
    assert pipe.text_encoder_2.calls == 1
    got = pipe.text_encoder_2.trace[0]["last_hidden_state"]
    ids = _ids([PROMPT])
    with torch.no_grad():
        fake_quant = _fake_quant_t5(t5fp8)(ids).last_hidden_state
        plain = _t5()(ids).last_hidden_state
    tolerance = read_manifest(t5fp8).component(T5).quant["parity"]["tolerance"]
    assert rel_l2(got, fake_quant) <= tolerance
    assert rel_l2(got, plain) > 100 * rel_l2(got, fake_quant)  # the engine is quantized, and like its torch model


def test_the_float32_parity_check_catches_a_broken_t5_graph(t5fp8: Path, tmp_path: Path) -> None:
    """One fp8 weight scale doubled in the graph: the component's parity check fails, naming its field."""
    import onnx
    from onnx import numpy_helper

    from dtcompile.manifest import read_manifest
    from dtcompile.models.components import TextEncoderGraph
    from dtcompile.quant.accuracy import HELDOUT_PROMPTS
    from dtcompile.quant.parity import component_parity

    graph = onnx.load(str(t5fp8 / read_manifest(t5fp8).component(T5).onnx.file))
    inits = {t.name: t for t in graph.graph.initializer}
    scope = "/block.0/layer.0/SelfAttention/v/weight_quantizer/"
    (dq,) = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and scope in n.name]
    scale = numpy_helper.to_array(inits[dq.input[1]]) * 2
    graph.graph.initializer.append(numpy_helper.from_array(scale, "scale_x2"))
    dq.input[1] = "scale_x2"
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    encoder = TextEncoderGraph(T5, ("last_hidden_state",))
    inputs = [{"input_ids": _ids([p])} for p in HELDOUT_PROMPTS[:2]]
    module = _fake_quant_t5(t5fp8)
    ok = component_parity(module, encoder.export_module, t5fp8 / "onnx" / f"{T5}.onnx", inputs,
                          encoder.outputs, "fp8", field="components[1].quant")  # fmt: skip
    assert ok.report.max_rel_err <= 1e-5
    with pytest.raises(VerificationError) as err:
        component_parity(module, encoder.export_module, broken, inputs, encoder.outputs, "fp8",
                         field="components[1].quant")  # fmt: skip
    message = str(err.value)
    assert message.startswith("components[1].quant fp8: the exported graph in onnxruntime differs from the fake-quant")
    assert "at output last_hidden_state, over the tolerance 0.001" in message and "\n" not in message


def test_a_bfloat16_t5_is_checked_in_float32(tmp_path: Path) -> None:
    """A 16-bit encoder's parity runs the float32 copy of its graph against the fake-quant model computing in
    float32 with the graph's rounded scales: export-exact, far below the tolerance."""
    import dataclasses

    import torch

    from dtcompile.core.graph import Range, Shapes
    from dtcompile.models.components import T5_QUANT_EXCLUDE, TextEncoderGraph
    from dtcompile.quant.calibration import calibrate_encoder
    from dtcompile.quant.export import export_quantized, float32_compute
    from dtcompile.quant.parity import component_parity
    from dtcompile.recipe.quant import parse_quant_spec
    from tests.quant.test_export import assert_same_state, float32_copy_reference, module_state

    module = _t5(torch.bfloat16)
    graph = TextEncoderGraph(T5, ("last_hidden_state",))
    ids = _ids(["a cat", "a dog on a boat", "two birds", "a red house"])
    spec = parse_quant_spec({"format": "fp8", "exclude": list(T5_QUANT_EXCLUDE)})
    result, module = calibrate_encoder(module, spec, T5_QUANT_EXCLUDE, ["p"] * 4, [{"input_ids": ids}], tmp_path,
                                       component_sha256="test", label=T5, record={})  # fmt: skip
    assert result.enabled_quantizers == T5_QDQ and not result.cache_hit
    shapes = Shapes(batch=Range(1, 1, 2), height=Range(64, 64, 64), width=Range(64, 64, 64), text_len=Range(32, 32, 32))
    ex = dataclasses.replace(graph.export_spec(module, shapes, torch.bfloat16), opset=19)
    with graph.exporting(module):  # eager attention: the SDPA symbolic fails on bfloat16
        qonnx = export_quantized(graph.export_module(module), ex, tmp_path / "onnx", name=T5, quant_format="fp8",
                                 dtype="bfloat16", patches=())  # fmt: skip
    assert qonnx.qdq.fp8_qdq == T5_QDQ
    # the model computing in float32 (T5's blocks one at a time, each holding a ModuleList of its own) is its
    # float32 copy to the bit, and is left as it was
    before = module_state(module)
    with torch.no_grad():
        expected = float32_copy_reference(module, torch.bfloat16)(ids).last_hidden_state
        with float32_compute(module, torch.bfloat16):
            got = module(ids).last_hidden_state
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert_same_state(module, before)
    inputs = [{"input_ids": ids[i : i + 1]} for i in range(len(ids))]
    parity = component_parity(module, graph.export_module, qonnx.artifact.path, inputs, graph.outputs, "fp8")
    record = parity.to_manifest()
    assert "bfloat16 computed in float32" in record["graph"] and record["reference"].endswith("(float32)")
    assert record["summary"]["max_rel_err"] <= 1e-4
    assert_same_state(module, before)


def test_an_unchanged_recipe_is_up_to_date_and_the_key_covers_the_component_quant(
    t5fp8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dtcompile.quant import calibration
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.load import locate_files
    from dtcompile.stages.plan import make_plan
    from dtcompile.stages.runner import _artifact_key, run_build

    same = load_recipe(RECIPE, [f"output.dir={t5fp8.parent}"])
    assert run_build(same).up_to_date

    def key(*overrides: str) -> str:
        recipe = load_recipe(RECIPE, [f"output.dir={t5fp8.parent}", *overrides])
        plan = make_plan(recipe)
        return _artifact_key(plan, locate_files(recipe, plan.source))[0]

    fp8 = key()
    assert fp8 == read_key(t5fp8) and fp8 != key(f"components=[transformer, {T5}]")  # quant off: another key
    # the calibration prompts' content (here the built-in file's: the recipe has no quant section)
    prompts = calibration.BUILTIN_PROMPTS_FILE.read_text().replace("a ", "an ", 1)
    (tmp_path / "prompts.txt").write_text(prompts)
    monkeypatch.setattr(calibration, "BUILTIN_PROMPTS_FILE", tmp_path / "prompts.txt")
    assert key() != fp8
    # unquantized components keep the keys of earlier artifacts: no quant field in the engine fields
    plain = load_recipe(ROOT / "recipes" / "tiny-flux-components.yaml")
    assert all("quant" not in c for c in plain.engine_fields()["components"])
    assert same.engine_fields()["components"][1] == {"name": T5, "dtype": None, "quant": "fp8"}


def read_key(artifact: Path) -> str:
    from dtcompile.manifest import read_manifest

    return read_manifest(artifact).key


def test_the_encoder_calibration_key_covers_its_quant_settings_only() -> None:
    from dtcompile.quant.calibration import encoder_calibration_key
    from dtcompile.recipe.quant import parse_quant_spec

    def key(spec: dict[str, Any] | None = None, exclude: tuple[str, ...] = ("*wo",), **kw: Any) -> str:
        args = {"prompts": ["a cat"], "component_sha256": "w", "dtype": "float32", "tokens": 32} | kw
        return encoder_calibration_key(parse_quant_spec(spec or {"format": "fp8"}), exclude, args.pop("prompts"),
                                       args.pop("component_sha256"), **args)  # fmt: skip

    base = key()
    assert base == key({"format": "fp8", "calib": {"steps": 3, "percentile": 0.5}})  # no denoising schedule
    changed = [
        key({"format": "int8"}),
        key(exclude=()),
        key(prompts=["a dog"]),
        key(component_sha256="other weights"),
        key(dtype="bfloat16"),
        key(tokens=64),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_refusals_are_one_line_naming_the_field_and_the_choices(tmp_path: Path) -> None:
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.plan import make_plan

    def error(recipe: Path, *overrides: str) -> str:
        with pytest.raises((RecipeError, UnsupportedError)) as err:
            make_plan(load_recipe(recipe, [*overrides, f"output.dir={tmp_path}"]))
        assert "\n" not in str(err.value)
        return str(err.value)

    def components(items: str) -> str:
        return f"components=[transformer, {items}]"

    assert error(RECIPE, components("{name: vae_decoder, quant: fp8}")) == (
        "components[1].quant: vae_decoder is the VAE decoder, which takes no quant format (it stays float: "
        "dtcompile never quantizes convolutions); remove quant from components[1] (text_encoder_2 takes fp8)"
    )
    assert error(RECIPE, components("{name: text_encoder, quant: fp8}")) == (
        "components[1].quant: text_encoder is a CLIP text encoder, which takes no quant format (CLIP encoders stay "
        "unquantized; fp8 is built for T5 encoders); remove quant from components[1] (text_encoder_2 takes fp8)"
    )
    for fmt in ("int8", "nvfp4", "svdquant"):
        assert error(RECIPE, components(f"text_encoder, {{name: {T5}, quant: {fmt}}}")) == (
            f"components[2].quant: {T5} is a T5 text encoder, which dtcompile does not build in {fmt}; "
            "choose one of: fp8"
        )
    assert error(RECIPE, f"components=[{{name: transformer, quant: fp8}}, {T5}]") == (
        "components[0].quant: the denoiser 'transformer' is quantized by the recipe's quant section; remove quant "
        "from components[0] and set quant.format: fp8"
    )
    assert error(RECIPE, "engine.targets=[sm_86]") == (
        "components[1].quant fp8 cannot target sm_86: it needs sm_89 or newer; remove sm_86 from engine.targets or "
        "remove quant from components[1]"
    )
    assert error(RECIPE, components(f"{{name: {T5}, quant: fp8, dtype: bfloat16}}")) == (
        "components[1].dtype: onnxruntime has no CPU kernels for bfloat16 graphs; set dtype: float32 or float16, "
        "or drop onnxruntime from engine.backends"
    )
    assert error(RECIPE, components(f"{{name: {T5}, quant: fp9}}")).endswith(
        "components[1].quant: 'fp9': not a quant format; choose one of: fp8, int8, nvfp4, svdquant (or null)"
    )
    sd3 = ROOT / "recipes" / "tiny-sd3-components.yaml"
    assert error(sd3, components("{name: text_encoder_2, quant: fp8}")).startswith(
        "components[1].quant: text_encoder_2 is a CLIP text encoder, which takes no quant format"
    )
    plan = make_plan(load_recipe(sd3, [components("{name: text_encoder_3, quant: fp8}"), f"output.dir={tmp_path}"]))
    assert "quantized components: text_encoder_3, calibrated on 128 prompts (builtin), 4 held out" in plan.lines()


def test_a_quantized_denoiser_and_t5_share_the_calibration_prompts(tmp_path: Path) -> None:
    """quant: fp8 on the transformer and fp8 on the T5: both calibrate on quant.calib's prompts; the denoiser's
    parity runs the pipeline with the encoder it was traced with (the T5's quantizers off meanwhile)."""
    from dtcompile.recipe import load_recipe
    from dtcompile.stages.runner import run_build

    overrides = [f"output.dir={tmp_path}", "engine={backends: [onnxruntime]}", f"components=[transformer, {{name: {T5}, quant: fp8}}]",
                 "quant.calib.size=2", "quant.calib.steps=2", "quant.accuracy.prompts=1", "quant.accuracy.steps=2"]  # fmt: skip
    m = run_build(load_recipe(ROOT / "recipes" / "tiny-flux-fp8.yaml", overrides)).manifest
    denoiser, t5 = m.component("transformer").quant, m.component(T5).quant
    assert denoiser["format"] == t5["format"] == "fp8"
    assert denoiser["calib"]["prompts_sha256"] == t5["calib"]["prompts_sha256"] and t5["calib"]["n_prompts"] == 2
    # the free-running parity run (the graph in the pipeline vs the fake-quant trace) starts from the same text
    # embeddings: its first step is the teacher-forced one (with the fp8 T5 on, 1.6e-3 against 2.0e-4)
    parity = denoiser["parity"]
    assert parity["free_running"]["rel_err_max"][0] == parity["teacher_forced"]["rel_err_max"][0]
    assert t5["parity"]["summary"]["max_rel_err"] < 1e-3 and t5["parity"]["gate"] == 1e-3


def test_the_t5_kind_names_what_it_quantizes_and_refuses_another_encoder() -> None:
    """The T5 kind's fp8 is built for T5 and UMT5 encoders; a CLIP module in its place is named in the refusal."""
    from types import SimpleNamespace

    from dtcompile.models.components import COMPONENT_KINDS

    t5 = COMPONENT_KINDS["t5"]
    assert t5.foreign(SimpleNamespace(config=SimpleNamespace(model_type="umt5"))) is None
    clip = type("CLIPTextModel", (), {"config": SimpleNamespace(model_type="clip_text_model")})()
    why = t5.foreign(clip)
    assert why == (
        "is a CLIPTextModel (model_type 'clip_text_model'), not a T5 text encoder (model_type 't5' or 'umt5')"
    )
