"""`dtc serve`'s video routes on an image-to-video artifact (tiny Wan2.2 I2V, onnxruntime, CPU): the openai client's
`videos.create` with `input_reference` makes the video `dtc run --image` makes for the same seed; a request without
the image is one 400 naming it."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.builds import ORT_ONLY, build_recipe
from tests.serve.test_server import KEY, Server, serving
from tests.test_serve_video import frames_of, psnr

pytest.importorskip("ftfy", reason="WanImageToVideoPipeline cleans prompts with ftfy (pip install ftfy)")
PROMPT = "a cat playing piano"


@pytest.fixture(scope="module")
def i2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe(tmp_path_factory, "tiny-wan22-i2v.yaml", *ORT_ONLY)


@pytest.fixture(scope="module")
def server(i2v: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-i2v")
    args = ("--api-key-env", "DTC_TEST_KEY", "--default-steps", "2", "--video-dir", str(tmp / "videos"), "--no-warmup")
    with serving(i2v, tmp, *args, env={"DTC_TEST_KEY": KEY}) as s:
        yield s


def _picture() -> bytes:
    """A 48x32 PNG (the artifact's opt size) with some structure."""
    from PIL import Image

    y, x = np.mgrid[0:32, 0:48].astype(np.float32)
    rgb = np.stack([x / 48, y / 32, 0.5 + 0.5 * np.sin((x + 2 * y) / 5.0)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_input_reference_makes_what_dtc_run_image_makes(server: Server, i2v: Path, tmp_path: Path) -> None:
    import openai
    from openai import OpenAI
    from PIL import Image

    from dtcompile.runtime.media import write_mp4
    from dtcompile.runtime.session import run_artifact

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks client.videos deprecated
    c = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    png = _picture()
    video = c.videos.create(model="tiny-wan22-i2v", prompt=PROMPT, size="48x32",
                            input_reference=("first.png", png, "image/png"),
                            extra_body={"num_frames": 5, "seed": 3, "num_inference_steps": 2, "fps": 8})  # fmt: skip
    deadline = time.monotonic() + 180
    while video.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        video = c.videos.retrieve(video.id)
    assert video.status == "completed", video
    served = frames_of(c.videos.download_content(video.id).read())
    assert served.shape == (5, 32, 48, 3)

    image = Image.open(io.BytesIO(png)).convert("RGB")
    ran = run_artifact(i2v, PROMPT, steps=2, seed=3, height=32, width=48, frames=5, image=image,
                       backend="onnxruntime")  # fmt: skip
    write_mp4(ran.image, tmp_path / "run.mp4", 8)
    same = psnr(served, frames_of((tmp_path / "run.mp4").read_bytes()))
    print(f"PSNR served I2V MP4 vs dtc run --image: {same:.1f} dB (100: identical)")
    assert same >= 40

    with pytest.raises(openai.BadRequestError, match="input_reference") as caught:
        c.videos.create(model="tiny-wan22-i2v", prompt=PROMPT, size="48x32")
    assert caught.value.body["param"] == "input_reference"
