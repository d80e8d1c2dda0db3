"""Per-request LoRA in `dtc serve --lora-dir` (issue 28, scope 2), on the session's tiny-flux artifact (CPU,
onnxruntime) through the official openai client.

Two adapters and none, interleaved: every image equals what the `dtc refit` artifact for its adapter set makes
(`run_artifact`, what `dtc run` calls; PSNR >= 40 dB), every request without LoRA is bit-identical to the plain
artifact's (no residue), swaps are counted and timed in /metrics and queued requests are grouped by adapter set.
Bad adapters are refused at start-up with one log line each; bad requests get 400 in OpenAI's shape naming the
parameter. The TensorRT swap (a live engine refit) needs a GPU and is skipped here with the reason.
"""

from __future__ import annotations

import base64
import functools
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.artifacts import edit_manifest
from tests.fixtures.lora import make_peft_lora
from tests.serve.test_server import KEY, Server, client, decode, psnr, serving

PROMPT = "a red fox in the snow"
SETS = {  # adapter set -> the request's lora list
    "style": [{"name": "style", "scale": 0.8}],
    "ink": [{"name": "ink", "scale": 1.0}],
    "none": [],
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """style (attention projections), ink (other modules, rank 2) and two files the server must refuse."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from dtcompile.models.builtin import builtin_model_path

    module = FluxTransformer2DModel.from_pretrained(
        builtin_model_path("tiny-flux") / "transformer", dtype=torch.float32
    )
    d = tmp_path_factory.mktemp("adapters")
    make_peft_lora(module, d / "style.safetensors", rank=4, alpha=8.0, seed=1)
    make_peft_lora(module, d / "ink.safetensors", rank=2, alpha=2.0, seed=2, targets=("to_q", "proj_mlp", "proj_out"))
    save_file({"not_a_lora": torch.zeros(2)}, str(d / "junk.safetensors"))
    # a LoRA for a wider model: its shapes do not fit the artifact's weights
    make_peft_lora(_wider(module), d / "wide.safetensors", rank=2, alpha=2.0, seed=3, targets=("to_q",))
    (d / "notes.txt").write_text("not an adapter: ignored")
    return d


def _wider(module: torch.nn.Module) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    cfg = dict(module.config)
    cfg["attention_head_dim"] = int(cfg["attention_head_dim"]) * 2
    cfg["axes_dims_rope"] = [2 * a for a in cfg["axes_dims_rope"]]
    return FluxTransformer2DModel.from_config(cfg)


@pytest.fixture(scope="module")
def refit(tiny_artifact: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The `dtc refit` artifact of each adapter set (the plain artifact for none): ``refit_artifact``, what
    `dtc refit ART --lora FILE:SCALE --out DIR --drop-unrefittable` calls."""
    from dtcompile.tools.refit import refit_artifact

    out = tmp_path_factory.mktemp("refit")
    arts = {"none": tiny_artifact}
    for name, items in SETS.items():
        if items:
            loras = [(str(lora_dir / f"{i['name']}.safetensors"), float(i["scale"])) for i in items]
            arts[name] = refit_artifact(tiny_artifact, loras, out_dir=out / name, drop_unrefittable=True).artifact_dir
    return arts


@pytest.fixture(scope="module")
def no_map(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the artifact under another name whose manifest has no weight map (no LoRA-refittable weights)."""
    art = tmp_path_factory.mktemp("nomap") / "plain"
    shutil.copytree(tiny_artifact, art)

    def edit(m: dict) -> None:
        m["name"] = "tiny-flux-plain"
        m["components"]["transformer"].pop("weight_map")

    edit_manifest(art, edit)
    return art


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, no_map: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve-lora")
    args = ("--lora-dir", str(lora_dir), "--api-key-env", "DTC_TEST_KEY", "--default-steps", "4", "--no-warmup")
    with serving(tiny_artifact, tmp, str(no_map), *args, env={"DTC_TEST_KEY": KEY}) as s:
        yield s


def _swaps(server: Server) -> float:
    return server.metric("dtc_lora_swaps_total{model=tiny-flux}")


def _generate(c, name: str, seed: int, steps: int = 4) -> np.ndarray:
    r = c.images.generate(model="tiny-flux", prompt=PROMPT, size="96x64",
                          extra_body={"seed": seed, "num_inference_steps": steps, "lora": SETS[name]})  # fmt: skip
    return decode(base64.b64decode(r.data[0].b64_json))


@functools.cache
def _session(art: Path):
    from dtcompile.runtime.session import Session

    return Session(art, "onnxruntime")


@functools.cache
def _reference(art: Path, seed: int) -> np.ndarray:
    """`dtc run ART --seed SEED --steps 4 --height 64 --width 96`'s image (its Session, kept per artifact)."""
    import io

    session = _session(art)
    image = session.generate(session.request(PROMPT, steps=4, seed=seed, height=64, width=96)).image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return decode(buf.getvalue())


def _interleaved(server: Server, refit: dict[str, Path], requests: int) -> None:
    c = client(server)
    order = [("style", "ink", "none")[i % 3] for i in range(requests)]
    seeds = [11 + (i // 3) % 2 for i in range(requests)]  # two seeds per set: references computed once each
    refs = {(n, s): _reference(refit[n], s) for n, s in sorted(set(zip(order, seeds, strict=True)))}
    before = _swaps(server)
    for name, seed in zip(order, seeds, strict=True):
        image = _generate(c, name, seed)
        if name == "none":  # no residue: the artifact's own bytes
            assert np.array_equal(image, refs[(name, seed)]), f"request {name} seed {seed} differs from the artifact"
        else:
            assert psnr(image, refs[(name, seed)]) >= 40, f"{name} seed {seed}"
    assert _swaps(server) - before == requests  # one request at a time, each with another set than the last
    assert server.metric("dtc_lora_swap_seconds_count{model=tiny-flux}") == _swaps(server)
    assert server.metric("dtc_lora_swap_seconds_sum{model=tiny-flux}") > 0


def test_adapters_are_checked_at_start_up_one_line_per_refusal(server: Server) -> None:
    log = server.log.read_text().splitlines()
    junk = [line for line in log if "junk.safetensors refused for model tiny-flux" in line]
    wide = [line for line in log if "wide.safetensors refused for model tiny-flux" in line]
    assert len(junk) == 1 and len(wide) == 1, log[-40:]
    assert "shape" in wide[0] or "size" in wide[0], wide[0]
    assert any("model tiny-flux-plain takes no per-request LoRA" in line and "weight map" in line for line in log)
    cards = {m.id: m for m in client(server).models.list().data}
    assert cards["tiny-flux"].lora == ["ink", "style"] and cards["tiny-flux-plain"].lora == []


def test_two_adapters_and_none_interleaved(server: Server, refit: dict[str, Path]) -> None:
    _interleaved(server, refit, 12)


@pytest.mark.slow
def test_two_adapters_and_none_interleaved_60(server: Server, refit: dict[str, Path]) -> None:
    _interleaved(server, refit, 60)


def test_queued_requests_are_grouped_by_adapter_set(server: Server, refit: dict[str, Path]) -> None:
    """A long request holds the worker while six interleaved ones queue: they run grouped by adapter set (at most
    3 swaps, not 6; same-set requests share a batch) and each equals its set's image (PSNR: a batch of 2 need not
    be bit-identical to a batch of 1)."""
    c = client(server)
    batches = _batches(server)
    first = threading.Thread(target=_generate, args=(c, "none", 5, 24))
    first.start()
    deadline = time.monotonic() + 60
    while _batches(server) == batches and time.monotonic() < deadline:  # until the long one runs
        time.sleep(0.02)
    before = _swaps(server)
    order = ["style", "ink", "none"] * 2
    images: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: images.__setitem__(i, _generate(c, n, 11)))
               for i, n in enumerate(order)]  # fmt: skip
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join()
    assert _swaps(server) - before <= 3
    for i, name in enumerate(order):
        ref = _reference(refit[name], 11)
        assert psnr(images[i], ref) >= 40, f"request {i} ({name})"


def _batches(server: Server) -> float:
    return server.metric("dtc_batch_size_count{model=tiny-flux}")


@pytest.mark.parametrize(
    ("model", "lora", "param", "says"),
    [
        ("tiny-flux", [{"name": "nope"}], "lora.0.name", "no adapter 'nope' for model tiny-flux (offered: ink, style)"),
        ("tiny-flux", [{"name": "junk"}], "lora.0.name", "no adapter 'junk'"),  # refused at start-up: not offered
        ("tiny-flux", [{"name": "style", "scale": 1e9}], "lora.0.scale", "outside"),
        ("tiny-flux", [{"name": "style", "scale": "x"}], "lora.0.scale", "valid number"),
        ("tiny-flux", [{"name": "style"}, {"name": "style"}], "lora.1.name", "named twice"),
        ("tiny-flux", [{"name": "style", "weight": 1}], "lora.0.weight", "unknown parameter"),
        ("tiny-flux-plain", [{"name": "style"}], "lora", "cannot take per-request LoRA"),
    ],
)
def test_bad_lora_requests_are_400_naming_the_parameter(server: Server, model, lora, param, says) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client(server).images.generate(model=model, prompt=PROMPT, extra_body={"lora": lora})
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == param and says in body["message"], body
    assert "\n" not in body["message"]


def test_edits_read_lora_from_the_form_the_openai_client_sends(server: Server) -> None:
    """tiny-flux edits no reference image, so a good adapter set gets past the lora check to the image's 400,
    while a bad name is refused naming lora.0.name: the form's lora[][name]/lora[][scale] arrived as a list."""
    import io

    import openai
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="PNG")
    c = client(server)
    for lora, param in (([{"name": "nope", "scale": 0.5}], "lora.0.name"), (SETS["style"], "image")):
        with pytest.raises(openai.BadRequestError) as err:
            c.images.edit(model="tiny-flux", image=("ref.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                          extra_body={"lora": lora})  # fmt: skip
        assert err.value.body["param"] == param, err.value.body


def test_edit_forms_carry_lora_as_the_openai_client_sends_it() -> None:
    from openai._qs import Querystring

    from dtcompile.serve.adapters import form_lora

    items = Querystring().stringify_items(
        {"lora": [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": 1}]}, array_format="brackets"
    )
    assert form_lora(items) == [{"name": "style", "scale": "0.8"}, {"name": "ink", "scale": "1"}]
    assert form_lora([("lora", '[{"name": "ink"}]')]) == [{"name": "ink"}]
    assert form_lora([]) is None


@pytest.mark.gpu
def test_a_live_tensorrt_engine_is_refit_from_the_base(lora_dir: Path, tmp_path: Path) -> None:
    """TensorRT: the served engine refit in place (Refitter) for style, then back to none, equals the refit
    artifact's engine for style and the plain engine bit for bit (needs a GPU: a refittable engine is built on it)."""
    from tests.fixtures.gpu import FLAVOUR, GPU_ARCH, NO_GPU_REASON, REFITTABLE, build_for_gpu

    if GPU_ARCH is None or FLAVOUR is None:
        pytest.skip(NO_GPU_REASON if GPU_ARCH is None else f"no TensorRT flavour for {GPU_ARCH} is installed")
    from dtcompile.runtime.session import Session
    from dtcompile.tools.live_lora import LiveLoras
    from dtcompile.tools.refit import refit_artifact

    base = build_for_gpu("tiny-flux", tmp_path / "base", REFITTABLE)
    style = refit_artifact(base, [(str(lora_dir / "style.safetensors"), 0.8)], out_dir=tmp_path / "style").artifact_dir

    def image(session: Session) -> np.ndarray:
        return np.asarray(session.generate(session.request(PROMPT, steps=4, seed=3)).image, dtype=np.float64)

    served = Session(base, FLAVOUR)
    served.load()
    plain = image(served)
    live = LiveLoras(served, {"style": lora_dir / "style.safetensors"})
    assert live.activate((("style", 0.8),)) is not None
    assert psnr(image(served), image(Session(style, FLAVOUR))) >= 40
    assert live.activate(()) is not None
    assert np.array_equal(image(served), plain)
