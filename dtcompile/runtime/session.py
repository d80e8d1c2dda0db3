"""One runtime session per artifact: what ``load_pipeline``, ``dtc run``, ``dtc serve`` and ``dtc bench`` run.

A ``Session`` reads and checks the manifest once, selects each component's engine for this machine, builds the
diffusers pipeline with the engines standing in (``Session.pipe``) and checks every call against the profile
the artifact was built for before any engine runs. Two ways in:

- ``Session.request(...)`` -> ``GenerationRequest`` (defaults filled, every value checked, errors naming the
  caller's own flag or field through ``ArgNames``) and ``Session.generate(request)`` -> ``Generation``: the CLI,
  the server and the benchmark.
- ``Session.pipe(...)``: the pipeline itself, taking a diffusers user's own call. Settings the user left at the
  pipeline's default that the artifact cannot take (FluxPipeline's ``max_sequence_length=512`` on an artifact
  built for 32 tokens; the default size) become the built opt, said once in the log; a value the user set
  outside the built range raises ``UnsupportedError`` naming the argument, the value, the range and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtcompile.core.errors import ArtifactError, DtcError, UnsupportedError
from dtcompile.core.targets import gpu_arch
from dtcompile.manifest import EngineEntry, Manifest, ShapeRange, Verifier, read_manifest
from dtcompile.models import adapter_for
from dtcompile.models.base import GenerationRequest
from dtcompile.models.components import WRAPPING_ROLES
from dtcompile.runtime.limits import check_guidance
from dtcompile.runtime.parallel import ParallelSpec, run_parallel, swap_prompts
from dtcompile.runtime.run import (
    aux_module,
    check_frames,
    check_generation,
    check_reference,
    denoiser_module,
    pipeline_config,
    pipeline_index,
    verify_pipeline_files,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from dtcompile.models.base import ModelAdapter

log = logging.getLogger("dtcompile.run")


@dataclass(frozen=True)
class ArgNames:
    """How a caller names each generation setting, so an error names what that caller typed."""

    height: str
    width: str
    frames: str
    batch: str
    text_len: str
    guidance: str
    negative_prompt: str
    image: str

    @property
    def size_flag(self) -> str:
        """The ``flag`` format of ``runtime.run.check_size`` (``--{}`` or ``{}``)."""
        return self.height.replace("height", "{}")


CLI_NAMES = ArgNames("--height", "--width", "--frames", "--batch", "--text-len", "--guidance", "--negative-prompt",
                     "--image")  # fmt: skip
PIPELINE_NAMES = ArgNames("height", "width", "num_frames", "num_images_per_prompt", "max_sequence_length",
                          "guidance_scale", "negative_prompt", "image")  # fmt: skip
REQUEST_NAMES = ArgNames("height", "width", "num_frames", "n", "max_sequence_length", "guidance_scale",
                         "negative_prompt", "image")  # fmt: skip


@dataclass(frozen=True)
class Generation:
    """What one generation produced: the images or videos (``media``), where and how long it ran, and, when
    asked, every denoiser call's output (``trace``) and a split artifact's cache counts."""

    media: list[Any]
    backend: str
    arch: str
    seconds: float
    steps: int
    trace: list[Any] = field(default_factory=list)
    engine_module: Any = None
    cache_stats: dict[str, Any] | None = None
    parallel: dict[str, Any] | None = None  # ranks, how the branches were split, bytes each rank sent per step
    swaps: list[Any] = field(default_factory=list)  # runtime.residency.Swap: engine loads and releases of this run

    @property
    def image(self) -> Any:
        """The first image (or video)."""
        return self.media[0]


class Session:
    """An artifact opened for generation on this machine (see the module docstring).

    ``backend``: "auto" (TensorRT on a matching GPU, else onnxruntime) or a backend name; ``verify``: how the
    files it loads are checked (``dtcompile.manifest.VERIFY_MODES``; True: "recorded"); ``cache``: for artifacts
    split into block engines, skip cached blocks (None: yes); elsewhere it must not be True. Engines load on
    first use of ``pipe`` (or ``load()``); the manifest is read here, once. ``cache_threshold``: a first_block
    or teacache artifact's threshold for this session; ``parallel``: this process is one rank of a CFG-parallel
    run (``runtime/parallel.py``); ``threads``: onnxruntime's intra-op threads per engine. ``residency``: "all"
    or "sequential" (``runtime/residency.py``; None: chosen from ``device_memory``, a budget such as "16GiB" that
    also sets streamable engines' budgets: ``runtime/memory.py``, docs/memory.md).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        backend: str = "auto",
        *,
        verify: bool | str = True,
        cache: bool | None = None,
        cache_threshold: float | None = None,
        parallel: ParallelSpec | None = None,
        threads: int | None = None,
        residency: str | None = None,
        device_memory: str | int | None = None,
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.threads = threads  # onnxruntime's intra-op threads per engine (None: its default)
        self.manifest: Manifest = read_manifest(self.artifact_dir)
        if self.manifest.stopped_after:
            raise ArtifactError(
                f"artifact stopped after stage '{self.manifest.stopped_after}'; it has no engines to run"
            )
        self.adapter: ModelAdapter = adapter_for(self.manifest.source.pipeline_class)
        self.config: Callable[[str], dict[str, Any] | None] = pipeline_config(self.artifact_dir)
        self.backend, self.verify, self.cache, self.cache_threshold = backend, verify, cache, cache_threshold
        main = self.manifest.denoiser(self.manifest.main_component())
        if cache and not main.is_split:
            raise UnsupportedError(
                f"--cache on: {self.artifact_dir} has no block engines (its recipe has no cache section); use "
                "--cache off"
            )
        if cache_threshold is not None:
            mode = (main.cache or {}).get("spec", {}).get("mode")
            if mode not in ("first_block", "teacache"):
                raise UnsupportedError(
                    f"--cache-threshold: {self.artifact_dir} has no threshold to set (cache mode: {mode or 'none'}); "
                    "it applies to first_block and teacache artifacts"
                )
            if not (math.isfinite(cache_threshold) and cache_threshold >= 0):
                raise UnsupportedError(f"--cache-threshold {cache_threshold}: expected a finite number >= 0")
        self.parallel, self.rank, self.cfg_rank = parallel, 0, 0
        if parallel is not None:
            self._check_parallel(parallel)
        from dtcompile.runtime.memory import session_residency

        self.residency, self.memory_plan = session_residency(
            self.artifact_dir, self.manifest, backend, residency, device_memory
        )
        self.module: Any = None  # the main denoiser's stand-in, once loaded
        self.entry: EngineEntry | None = None
        self._pipe: Any = None
        self._text_pipe: Any = None  # the text-only pipeline over the same engines (``image_optional`` artifacts)
        self.model_index = pipeline_index(self.artifact_dir)  # the saved pipeline's model_index.json
        optional = getattr(self.adapter, "image_optional", None)
        self.image_optional = bool(optional and optional(self.model_index))
        self._told: set[str] = set()  # defaults already reported in the log

    def _check_parallel(self, spec: ParallelSpec) -> None:
        if spec.ulysses > 1 or spec.world == 1:  # world 1: the torch path on one rank (bench's baseline)
            from dtcompile.runtime.ulysses import check_ulysses

            check_ulysses(self.manifest, self.adapter, spec.ulysses, self.pipeline_class)
        if spec.cfg > 1 and self.adapter.guidance_branches is None:
            raise UnsupportedError(
                f"--parallel cfg={spec.cfg}: {self.pipeline_class} artifacts have no classifier-free guidance "
                "branches to split (guidance is distilled into the model)"
            )
        if self.manifest.component(self.manifest.main_component()).is_split:
            raise UnsupportedError(
                f"--parallel {spec.text}: {self.artifact_dir} is split into block engines for caching; parallel runs "
                "monolithic denoisers (build without the cache section)"
            )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def shapes(self) -> dict[str, ShapeRange]:
        return self.manifest.shapes

    @property
    def video(self) -> bool:
        return bool(self.adapter.video)

    @property
    def pipeline_class(self) -> str:
        return self.manifest.source.pipeline_class

    @property
    def pipe(self) -> Any:
        """The diffusers pipeline with the engines standing in (loaded on first use)."""
        return self.load()

    # --- loading ---------------------------------------------------------------------------------------------

    def load(self) -> Any:
        """Select, verify and open every engine, and build the pipeline around them (once)."""
        if self._pipe is not None:
            return self._pipe
        import diffusers

        manifest, artifact_dir = self.manifest, self.artifact_dir
        verifier = Verifier(artifact_dir, self.verify)
        main = manifest.main_component()
        run = None
        if manifest.component(main).is_split:
            from dtcompile.runtime.cache import CacheRun

            run = CacheRun()  # shared by the experts (Wan2.2): one step count, a cache state per expert, one report

        groups = self._join_ranks()

        def denoiser(name: str) -> tuple[Any, EngineEntry]:
            if groups is not None and self.parallel is not None and self.parallel.ulysses_torch:
                return self._ulysses_denoiser(name, groups)
            if run is None or not manifest.component(name).is_split:
                return denoiser_module(artifact_dir, manifest, name, self.backend, verifier, self.threads,
                                       self.residency)  # fmt: skip
            from dtcompile.runtime.cache import load_cached_module

            return load_cached_module(artifact_dir, manifest, name, self.backend, gpu=gpu_arch(), verifier=verifier,
                                      enabled=self.cache is not False, run=run,
                                      threshold=self.cache_threshold, threads=self.threads)  # fmt: skip

        module, entry = denoiser(main)
        standins, wrappers = self._aux_standins(verifier)
        for name in manifest.denoiser_names()[1:]:  # Wan2.2's second expert: the pipeline switches between them
            standins[name] = denoiser(name)[0]
        pipeline_dir = artifact_dir / "pipeline"
        if not (pipeline_dir / "model_index.json").is_file():
            raise ArtifactError(
                f"{pipeline_dir}: artifact has no pipeline files (built with output.include_pipeline: false)"
            )
        verify_pipeline_files(artifact_dir, manifest, verifier)
        verifier.save()
        log.info("verified %d file(s) by sha256, %d by their record (verify=%s)", len(verifier.hashed),
                 len(verifier.trusted), verifier.mode)  # fmt: skip
        diffusers.utils.logging.disable_progress_bar()
        cls = checked_pipeline_class(getattr(diffusers, self.pipeline_class))
        standins[main] = module
        self.residency.attach(standins.values())  # sequential: engines load before a step's timing starts
        with _quiet_type_warnings(standins):
            pipe = cls.from_pretrained(pipeline_dir, **standins, dtype=module.dtype, use_safetensors=True)
        for attr, wrapper in wrappers.items():
            wrapper.attach(getattr(pipe, attr))
            setattr(pipe, attr, wrapper)
        pipe._dtc_session = self
        pipe.set_progress_bar_config(disable=True)
        pipe.to(module.device)
        if groups is not None and self.parallel is not None and self.parallel.cfg > 1:
            self._cfg_parallel(pipe, groups)
            module = getattr(pipe, main)
        self.module, self.entry, self._pipe = module, entry, pipe
        return pipe

    def _aux_standins(self, verifier: Verifier) -> tuple[dict[str, Any], dict[str, Any]]:
        """The engine-backed text encoders, image encoder and VAE halves: (stand-ins the pipeline loads in place
        of its attribute, wrappers put around the attribute it loads: a VAE encoder around the VAE)."""
        standins: dict[str, Any] = {}
        wrappers: dict[str, Any] = {}
        for name in self.manifest.aux_names():
            stand_in = aux_module(self.artifact_dir, self.manifest, name, self.backend, verifier, self.threads,
                                  self.residency)  # fmt: skip
            aux = self.manifest.aux(name)
            # a VAE encoder engine wraps what the pipeline loads at ``vae`` (torch VAE or the decoder's stand-in)
            (wrappers if aux.role in WRAPPING_ROLES else standins)[aux.attr or name] = stand_in
        return standins, wrappers

    def _cfg_parallel(self, pipe: Any, groups: Any) -> None:
        """Every denoiser of ``pipe`` answers for one guidance branch on this rank."""
        from dtcompile.runtime.parallel import cfg_parallel_module

        branches = str(self.adapter.guidance_branches)  # _check_parallel refused None
        for name in self.manifest.denoiser_names():
            wrapped = cfg_parallel_module(getattr(pipe, name), groups.cfg_rank, branches, groups.cfg_group, self.rank)
            setattr(pipe, name, wrapped)

    def _join_ranks(self) -> Any:
        """This rank's ``ParallelGroups`` (joining the process group), None without ``parallel``; a one-rank
        spec (the torch baseline) joins nothing."""
        if self.parallel is None:
            return None
        from dtcompile.runtime.parallel import ParallelGroups, init_ranks, process_groups

        if self.parallel.world == 1:
            return ParallelGroups(0, 0, None, 0, None)
        self.rank, _ = init_ranks()
        groups = process_groups(self.parallel, self.rank)
        self.cfg_rank = groups.cfg_rank
        return groups

    def _ulysses_denoiser(self, name: str, groups: Any) -> tuple[Any, EngineEntry]:
        """Denoiser ``name`` as one rank of a sequence group: the source model in torch (``runtime/ulysses.py``);
        the engine entry this machine would run is kept for the report, not opened."""
        import torch

        from dtcompile.runtime.engines import select_engine
        from dtcompile.runtime.ulysses import SequenceGroup, load_source_denoiser, ulysses_module

        assert self.parallel is not None
        dtype = getattr(torch, self.manifest.dtype)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        comm = SequenceGroup(groups.seq_group, self.parallel.ulysses, groups.seq_rank)
        inner = load_source_denoiser(self.manifest, name, dtype, device)
        config = dict(self.manifest.component(name).config or {})
        module = ulysses_module(inner, self.adapter, comm, self.rank, config, dtype, device)
        return module, select_engine(self.manifest, name, self.backend, gpu_arch())

    def check_ulysses_request(self, request: GenerationRequest) -> None:
        """UnsupportedError when the request's tokens do not split evenly over the sequence ranks."""
        if self.parallel is None or self.parallel.ulysses == 1:
            return
        p = self.parallel.ulysses
        layout = self.ulysses_layout(request)
        for what, n in (("tokens", layout.out_tokens), ("text tokens", layout.tokens - layout.out_tokens)):
            if n % p:
                raise UnsupportedError(
                    f"--parallel ulysses={p}: {request.height}x{request.width}"
                    f"{f' x {request.frames} frames' if request.frames else ''} makes {n} {what}, which do not split "
                    f"over {p} ranks; pick a size whose token count divides by {p}"
                )

    def ulysses_layout(self, request: GenerationRequest) -> Any:
        """The family's ``UlyssesLayout`` of one denoiser call of ``request``."""
        config = self.manifest.component(self.manifest.main_component()).config or {}
        return self.adapter.ulysses_layout(config, self.config, request.height, request.width, request.frames,
                                           int(request.text_len or self.shapes["text_len"].opt))  # fmt: skip

    # --- requests (CLI, server, bench) -------------------------------------------------------------------------

    def request(
        self,
        prompt: str | list[str],
        *,
        steps: int,
        seed: int | None = None,
        generator: Any = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        last_image: Any = None,
        images_per_prompt: int = 1,
        callback: Any = None,
        names: ArgNames = CLI_NAMES,
    ) -> GenerationRequest:
        """A checked ``GenerationRequest``: sizes and frames default to the built opt, every value is checked
        against the profile and the family's rules (UnsupportedError naming ``names``' flag), text length is the
        built one. ``seed`` (when no ``generator`` is given) seeds a CPU generator, as ``dtc run --seed`` does."""
        if generator is None and seed is not None:
            import torch

            generator = torch.Generator("cpu").manual_seed(seed)
        shapes = self.shapes
        check_reference(self.adapter, image, self.pipeline_class, flag=names.image, optional=self.image_optional)
        sized = getattr(self.adapter, "reference_size", None)  # image-to-video: the size follows the image
        if sized is not None and image is not None and height is None and width is None:
            height, width = sized(image.size, shapes["height"], shapes["width"], self.config)
        height = height or shapes["height"].opt
        width = width or shapes["width"].opt
        if last_image is not None:
            check_last = getattr(self.adapter, "check_last_image", None)
            if check_last is None:
                raise UnsupportedError(f"--last-image: {self.pipeline_class} artifacts take no last image")
            check_last(self.manifest.component(self.manifest.main_component()).config or {}, self.model_index)
        if self.video and frames is None:
            frames = shapes["frames"].opt
        if guidance is not None:
            check_guidance(guidance, names.guidance)
        check_generation(self.manifest, height, width, self.config, flag=names.size_flag)
        check_frames(self.manifest, frames, self.config, flag=names.frames)
        if negative_prompt is not None and not self.adapter.negative_prompt:
            raise UnsupportedError(f"{names.negative_prompt}: {self.pipeline_class} artifacts take no negative prompt")
        self.check_batch((len(prompt) if isinstance(prompt, list) else 1) * images_per_prompt, names.batch)
        checked = GenerationRequest(
            prompt,
            steps,
            height,
            width,
            generator=generator,
            guidance=guidance,
            text_len=shapes["text_len"].opt,
            images_per_prompt=images_per_prompt,
            callback=callback,
            negative_prompt=negative_prompt,
            image=image,
            frames=frames,
            last_image=last_image,
        )
        self.check_ulysses_request(checked)
        return checked

    def check_batch(self, batch: int, name: str) -> None:
        """UnsupportedError naming ``name`` when ``batch`` outputs per call are outside the built batch range."""
        r = self.shapes["batch"]
        if not r.min <= batch <= r.max:
            raise UnsupportedError(
                f"{name} {batch} is outside the artifact's range {r.min}..{r.max}; rebuild with export.shapes.batch "
                "covering it"
            )

    def generate(self, request: GenerationRequest, *, trace: bool = False) -> Generation:
        """Run the pipeline on a request from ``request()``; ``trace`` keeps every denoiser call's output."""
        import torch

        pipe = self.load()
        module = self.module
        experts = [getattr(pipe, name) for name in self.manifest.denoiser_names()[1:]]
        module.trace = [] if trace else None
        for expert in experts:  # Wan2.2's low-noise expert records into the same list, in call order
            expert.trace = module.trace
        kwargs = self.adapter.call_kwargs(request)
        if self.image_optional and request.image is None:  # text-to-video from an image-to-video artifact (TI2V)
            pipe = self.text_pipe()
            kwargs = {k: v for k, v in kwargs.items() if k not in ("image", "last_image")}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(**kwargs)
        seconds = time.perf_counter() - t0
        assert self.entry is not None
        backend = "torch" if self.parallel is not None and self.parallel.ulysses_torch else self.entry.backend
        log.info("%d steps on %s %s in %.2fs", request.steps, backend, self.entry.arch, seconds)
        stats = module.cache_stats() if hasattr(module, "cache_stats") else None
        parallel = self._parallel_report(request) if self.parallel is not None else None
        swaps = self.residency.take_swaps()
        return Generation(self.adapter.output_media(out), backend, self.entry.arch, seconds, request.steps,
                          module.trace or [], module, stats, parallel, swaps)  # fmt: skip

    def text_pipe(self) -> Any:
        """The adapter's ``text_pipeline_class`` (WanPipeline) over this artifact's components and engines, for
        artifacts that also make videos without an image (``image_optional``: Wan2.2 TI2V); its calls go through
        ``prepare_call`` as ``pipe``'s do."""
        if not self.image_optional:
            raise UnsupportedError(f"{self.pipeline_class} artifacts need an image; this one has no text-only pipeline")
        if self._text_pipe is None:
            import diffusers

            pipe = self.load()
            name = getattr(self.adapter, "text_pipeline_class", None)  # image-to-video adapters only
            cls = checked_pipeline_class(getattr(diffusers, str(name)))
            params = inspect.signature(cls.__init__).parameters
            comps = {k: v for k, v in pipe.components.items() if k in params}
            config = {k: pipe.config[k] for k in params if k in pipe.config and k not in comps}
            text = cls(**comps, **config)
            text._dtc_session = self
            text.set_progress_bar_config(disable=True)
            self._text_pipe = text
        return self._text_pipe

    def _parallel_report(self, request: GenerationRequest) -> dict[str, Any]:
        """Ranks, bytes each rank sent per step (CFG and Ulysses apart, Ulysses' next to the prediction from the
        shapes), reset for the next run."""
        assert self.parallel is not None
        spec, pipe, names = self.parallel, self._pipe, self.manifest.denoiser_names()
        outer = [getattr(pipe, n) for n in names]
        inner = [getattr(m, "inner", m) if spec.cfg > 1 else m for m in outer] if spec.ulysses_torch else []
        seq = sum(m.bytes_sent for m in inner)
        total = sum(m.bytes_sent for m in outer) + (seq if spec.cfg > 1 else 0)
        report: dict[str, Any] = {"ranks": spec.world, "cfg": spec.cfg, "ulysses": spec.ulysses, "rank": self.rank,
                                  "split": self.adapter.guidance_branches if spec.cfg > 1 else None,
                                  "bytes_sent_per_step": total / request.steps}  # fmt: skip
        if inner:
            from dtcompile.runtime.ulysses import predicted_bytes

            calls = sum(m.calls for m in inner)
            batch = (len(request.prompt) if isinstance(request.prompt, list) else 1) * request.images_per_prompt
            element = 2 if self.manifest.dtype in ("float16", "bfloat16") else 4
            per_call = predicted_bytes(self.ulysses_layout(request), spec.ulysses, batch, element)
            report.update(ulysses_bytes_per_step=seq / request.steps, ulysses_calls_per_step=calls / request.steps,
                          ulysses_predicted_bytes_per_step=per_call.total * calls / request.steps,
                          ulysses_predicted_per_call={"all_to_all": per_call.all_to_all, "gather": per_call.gather})  # fmt: skip
            for m in inner:
                m.calls = 0
        for m in outer + inner:
            m.bytes_sent = 0
        return report

    # --- a diffusers user's own call -------------------------------------------------------------------------

    def prepare_call(self, bound: inspect.BoundArguments) -> None:
        """Check (and where the user left a default the artifact cannot take, adapt) the arguments of a call of
        the pipeline, in place; UnsupportedError naming the argument otherwise."""
        args, shapes, names = bound.arguments, self.shapes, PIPELINE_NAMES
        given = {k for k, v in args.items() if v is not None}
        params = bound.signature.parameters
        if "max_sequence_length" in params:
            self._text_length(args, params["max_sequence_length"].default)
        for var in ("height", "width"):
            if args.get(var) is None:
                args[var] = shapes[var].opt
                self._tell(var, f"{var} not given: using the artifact's built {var} {shapes[var].opt}")
        check_generation(self.manifest, args["height"], args["width"], self.config, flag="{}")
        if self.video and "num_frames" in params:
            if args.get("num_frames") is None:
                args["num_frames"] = shapes["frames"].opt
                self._tell("num_frames", f"num_frames not given: using the artifact's built {shapes['frames'].opt}")
            check_frames(self.manifest, args["num_frames"], self.config, flag="num_frames")
        guidance = args.get("guidance_scale")
        if guidance is not None:
            check_guidance(guidance, names.guidance)
        if isinstance(args.get("image"), str) and args.get("prompt") is None:
            raise UnsupportedError(
                f"image: got the text {args['image'][:40]!r}; {self.pipeline_class}'s first argument is the reference "
                "image: pass the text as prompt=..."
            )
        if args.get("image") is not None and not self.adapter.reference_image:
            raise UnsupportedError(
                f"image: this {self.pipeline_class} artifact was built for generation without a reference image; "
                "rebuild it for editing or leave image unset"
            )
        per_prompt = getattr(self.adapter, "per_prompt_key", "num_images_per_prompt")
        self.check_batch(_prompt_count(args) * int(args.get(per_prompt) or 1), f"batch (prompts x {per_prompt})")
        self.adapter.adapt_call(args, given)
        if (
            self.parallel is not None
            and self.parallel.cfg > 1
            and self.cfg_rank == 1
            and (self.adapter.guidance_branches == "sequential")
        ):
            # every call (Session.generate's too) comes through here: rank 1's first call takes the negative prompt
            args["prompt"], args["negative_prompt"] = swap_prompts(args.get("prompt"), args.get("negative_prompt"))
        if hasattr(self.module, "begin_run"):  # a block-cache run: rules and the last step need the run's length
            steps = args.get("num_inference_steps") or params["num_inference_steps"].default
            custom = args.get("sigmas") if args.get("sigmas") is not None else args.get("timesteps")
            self.module.begin_run(len(custom) if custom is not None else int(steps))

    def _text_length(self, args: dict[str, Any], default: Any) -> None:
        r = self.shapes["text_len"]
        embeds = args.get("prompt_embeds")
        if embeds is not None and hasattr(embeds, "shape"):
            tokens = int(embeds.shape[1]) - int(getattr(self.adapter, "prompt_embeds_extra_tokens", 0))
            if not r.min <= tokens <= r.max:
                raise UnsupportedError(
                    f"prompt_embeds: {tokens} text tokens, outside the artifact's built text length {_span(r)} "
                    "(export.shapes.text_len); encode with max_sequence_length in that range or rebuild"
                )
        value = args.get("max_sequence_length")
        if value is None:
            args["max_sequence_length"] = r.opt
            if default != r.opt:
                self._tell(
                    "max_sequence_length",
                    f"max_sequence_length not given: the pipeline's default {default} becomes the artifact's built "
                    f"text length {r.opt}",
                )
        elif not r.min <= int(value) <= r.max:
            raise UnsupportedError(
                f"max_sequence_length={value} is outside the artifact's built text length {_span(r)}; pass "
                f"max_sequence_length={r.opt} or rebuild with export.shapes.text_len covering it"
            )

    def _tell(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.info("%s: %s", self.name, message)


def _prompt_count(args: dict[str, Any]) -> int:
    embeds = args.get("prompt_embeds")
    if embeds is not None and hasattr(embeds, "shape"):
        return int(embeds.shape[0])
    prompt = args.get("prompt")
    return len(prompt) if isinstance(prompt, list) else 1


def _span(r: ShapeRange) -> str:
    return str(r.min) if r.min == r.max else f"{r.min}..{r.max}"


@functools.cache
def checked_pipeline_class(cls: type) -> Any:
    """A subclass of diffusers pipeline class ``cls`` whose calls go through its ``Session.prepare_call`` first
    (an instance is still a ``cls``; ``from_pretrained`` builds it as it builds ``cls``)."""
    signature = inspect.signature(cls.__call__)

    class Checked(cls):  # a subclass of a class known only at run time
        _dtc_session: Session

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            self._dtc_session.prepare_call(bound)
            return super().__call__(*bound.args[1:], **bound.kwargs)

    Checked.__name__ = Checked.__qualname__ = cls.__name__
    Checked.__doc__ = cls.__doc__
    return Checked


class _quiet_type_warnings:
    """Drop diffusers' "Expected types for <component>" warning for the components engines stand in for (they
    are stand-ins by design) while a pipeline loads; any other warning passes."""

    def __init__(self, standins: dict[str, Any]) -> None:
        self.prefixes = tuple(f"Expected types for {name}:" for name in standins)
        self.logger = logging.getLogger("diffusers.pipelines.pipeline_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


def load_engine_pipeline(
    artifact_dir: Path, backend: str = "auto", *, verify: bool | str = True, cache: bool | None = None
) -> tuple[Any, Any, Manifest, EngineEntry]:
    """(pipeline, engine module, manifest, engine entry) of an artifact's ``Session`` on this machine."""
    session = Session(artifact_dir, backend, verify=verify, cache=cache)
    pipe = session.load()
    assert session.entry is not None
    return pipe, session.module, session.manifest, session.entry


def run_artifact(
    artifact_dir: Path,
    prompt: str,
    *,
    steps: int = 4,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    image: Any = None,
    last_image: Any = None,
    frames: int | None = None,
    backend: str = "auto",
    trace: bool = False,
    verify: bool | str = True,
    cache: bool | None = None,
    cache_threshold: float | None = None,
    threads: int | None = None,
) -> Generation:
    """Generate one image (or, for video artifacts, one video of ``frames`` frames: default the built opt)
    through a ``Session``; ``trace`` keeps every step's noise prediction.

    ``cache``: skip cached blocks of a cache-split artifact (None: when it has a cache section; False: run all);
    ``cache_threshold``: a first_block or teacache artifact's threshold for this run.
    """
    session = Session(artifact_dir, backend, verify=verify, cache=cache, cache_threshold=cache_threshold,
                      threads=threads)  # fmt: skip
    request = session.request(
        prompt,
        steps=steps,
        seed=seed,
        height=height,
        width=width,
        frames=frames,
        guidance=guidance,
        negative_prompt=negative_prompt,
        image=image,
        last_image=last_image,
    )
    return session.generate(request, trace=trace)


def run_artifact_parallel(
    artifact_dir: Path, spec: ParallelSpec, prompt: str, *, backend: str = "auto", verify: bool | str = True,
    timeout_s: float | None = None, threads: int | None = None, **request: Any,
) -> Generation:  # fmt: skip
    """``run_artifact`` on ``spec.world`` local ranks (``runtime/parallel.py``): the request is checked here
    first, then every rank opens the artifact and rank 0's result comes back (its trace included when
    ``request["trace"]``). ``threads``: torch's and onnxruntime's threads in each rank."""
    from dtcompile.runtime.parallel import DEFAULT_TIMEOUT_S

    trace = bool(request.pop("trace", False))
    Session(artifact_dir, backend, verify=verify, parallel=spec).request(prompt, **request)  # errors before spawning
    job = functools.partial(_rank_generate, Path(artifact_dir), spec, prompt, backend, verify, trace, threads, request)
    result: Generation = run_parallel(spec, job, timeout_s=timeout_s or DEFAULT_TIMEOUT_S, threads=threads)
    return result


def _rank_generate(
    artifact_dir: Path, spec: ParallelSpec, prompt: str, backend: str, verify: bool | str, trace: bool,
    threads: int | None, request: dict[str, Any], rank: int,
) -> Generation:  # fmt: skip
    """One rank's generation (what ``run_artifact_parallel`` runs on every rank), without its modules."""
    session = Session(artifact_dir, backend, verify=verify, parallel=spec, threads=threads)
    session.load()
    result = session.generate(session.request(prompt, **request), trace=trace)
    return dataclasses.replace(result, engine_module=None)


def follow_requests(
    artifact_dir: Path, spec: ParallelSpec, backend: str, verify: bool | str, threads: int | None, rank: int
) -> None:
    """A follower rank of a served CFG-parallel model: open the artifact, then run every request rank 0
    broadcasts (``broadcast_request``) until it broadcasts None."""
    import torch.distributed as dist

    session = Session(artifact_dir, backend, verify=verify, parallel=spec, threads=threads)
    session.load()
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        try:
            session.generate(session.request(**seeded(box[0])))
        except DtcError as exc:  # rank 0 met the same check on the same request: both go on to the next one
            log.warning("rank %d: %s", rank, exc)


def broadcast_request(settings: dict[str, Any]) -> None:
    """Rank 0 of a served CFG-parallel model: hand ``settings`` (``Session.request`` keywords, generators given
    as ``seeds``) to the follower ranks before running them itself."""
    import torch.distributed as dist

    dist.broadcast_object_list([settings], src=0)


def seeded(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``seeds`` (a list, one per output) turned into CPU generators."""
    import torch

    out = dict(settings)
    seeds = out.pop("seeds", None)
    if seeds is not None:
        out["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return out
