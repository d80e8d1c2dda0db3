"""CFG parallel: the two classifier-free-guidance branches of one request on two ranks at once.

Each rank runs the whole diffusers pipeline (scheduler, text encoders, VAE: cheap next to the denoiser) on its
own device, and a ``CfgParallelModule`` stands in for every denoiser: each denoising step, each rank runs the
engine on one branch only and an ``all_gather`` gives both ranks both branches, so every rank's pipeline sees
the same noise predictions and ends with the same latents. How a family runs its branches
(``ModelAdapter.guidance_branches``):

- ``batched`` (SD3): one call on a doubled batch ``[uncond, cond]``; rank r computes half r of every input.
- ``sequential`` (Wan): a "cond" call, then an "uncond" call (``cache_context``). Rank 1 runs its pipeline with
  the prompt and the negative prompt swapped, so its first call carries the unconditional inputs while rank 0's
  carries the conditional ones; both calls then answer from the gathered pair ("cond": rank 0's output,
  "uncond": rank 1's), so the swap never reaches the latents.

Ranks are started by ``run_parallel`` (torch.multiprocessing, a free local port) or by ``torchrun`` (the
environment's RANK / WORLD_SIZE / MASTER_ADDR). Collectives use NCCL between GPUs and gloo on CPUs, with a
timeout: a rank that dies ends the run on every rank (``run_parallel`` names it in one line).
Ulysses sequence parallel (``runtime/ulysses.py``) splits each denoiser call's tokens over a sequence group;
with ``cfg=2,ulysses=N`` the world is 2 CFG groups of N sequence ranks (``ParallelGroups``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtcompile.core.errors import DtcError, UnsupportedError

DEFAULT_TIMEOUT_S = 300.0
#: Test hook: "RANK:CALL" makes that rank exit at that denoiser call, as a crash would (tests/test_parallel.py).
FAULT_ENV = "DTC_FAULT_RANK_EXIT"
TIMEOUT_ENV = "DTC_PARALLEL_TIMEOUT_S"


@dataclass(frozen=True)
class ParallelSpec:
    """``--parallel cfg=2[,ulysses=N]``: ranks per CFG branch split and per sequence split (world: their
    product; rank r is CFG rank ``r // ulysses`` and sequence rank ``r % ulysses``)."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    @property
    def ulysses_torch(self) -> bool:
        """Whether the denoisers run in torch split over sequence ranks (also a one-rank spec: bench's baseline)."""
        return self.ulysses > 1 or self.world == 1

    @property
    def text(self) -> str:
        """The ``--parallel`` value that makes this spec."""
        return ",".join(f"{k}={v}" for k, v in (("cfg", self.cfg), ("ulysses", self.ulysses)) if v > 1) or "ulysses=1"

    @classmethod
    def parse(cls, text: str, flag: str = "--parallel") -> ParallelSpec:
        """``cfg=2``, ``ulysses=N``, ``cfg=2,ulysses=N``; UnsupportedError naming ``flag`` for anything else."""
        values: dict[str, int] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = item.partition("=")
            if key not in ("cfg", "ulysses") or not value.isdigit() or key in values:
                raise UnsupportedError(
                    f"{flag} {text}: expected cfg=2 and/or ulysses=N (comma-separated key=count, each once)"
                )
            values[key] = int(value)
        spec = cls(**values)
        if spec.cfg not in (1, 2):
            raise UnsupportedError(f"{flag} {text}: cfg splits the two guidance branches: cfg=2 (or 1)")
        if spec.ulysses < 1:
            raise UnsupportedError(f"{flag} {text}: ulysses counts the ranks one sequence is split over: 2 or more")
        if spec.world < 2:
            raise UnsupportedError(f"{flag} {text}: nothing to split; use cfg=2 or ulysses=2")
        return spec


def init_ranks(timeout_s: float | None = None) -> tuple[int, int]:
    """(rank, world size) of this process, joining the process group from the environment (torchrun or
    ``run_parallel``) when it is not joined yet; NCCL when CUDA is there, else gloo."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise UnsupportedError(
                "parallel: this process was not started as one of several ranks; use dtc run --parallel cfg=2, or "
                "launch your script with torchrun --nproc-per-node 2"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        seconds = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        os.environ[TIMEOUT_ENV] = str(seconds)  # the sub-groups' timeout (process_groups)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in a ``ParallelSpec`` world: its CFG rank and group (the ranks holding the same tokens
    of the other branch) and its sequence rank and group (the ranks splitting one branch's tokens)."""

    rank: int
    cfg_rank: int
    cfg_group: Any
    seq_rank: int
    seq_group: Any


def process_groups(spec: ParallelSpec, rank: int) -> ParallelGroups:
    """The CFG and sequence groups of ``spec`` (every rank creates every group, in the same order, as
    ``torch.distributed.new_group`` requires); a world of one kind only uses the default group for it."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    cfg_group = seq_group = None
    if spec.cfg > 1 and spec.ulysses > 1:
        for s in range(spec.ulysses):  # ranks s, s + U, ...: the same tokens of each branch
            g = dist.new_group([s + c * spec.ulysses for c in range(spec.cfg)], timeout=timeout)
            cfg_group = g if s == rank % spec.ulysses else cfg_group
        for c in range(spec.cfg):  # ranks cU .. cU + U - 1: one branch's sequence
            g = dist.new_group(list(range(c * spec.ulysses, (c + 1) * spec.ulysses)), timeout=timeout)
            seq_group = g if c == rank // spec.ulysses else seq_group
    elif spec.ulysses > 1:
        seq_group = dist.group.WORLD
    else:
        cfg_group = dist.group.WORLD
    return ParallelGroups(rank, rank // spec.ulysses, cfg_group, rank % spec.ulysses, seq_group)


def fault_point(rank: int, call: int) -> None:
    """Test hook: exit as a crash would when ``DTC_FAULT_RANK_EXIT`` is ``"rank:call"``."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{rank}:{call}":
        os._exit(3)


def cfg_parallel_module(inner: Any, rank: int, mode: str, group: Any = None, world_rank: int | None = None) -> Any:
    """The ``CfgParallelModule`` standing in for ``inner`` (a denoiser stand-in) on CFG ``rank`` of ``group``
    (None: the default group); ``world_rank``: this process's rank (fault hook; default ``rank``)."""
    fault_rank = rank if world_rank is None else world_rank
    from dtcompile.backends.standin import ComponentStandIn

    class CfgParallelModule(ComponentStandIn):
        """Runs ``inner`` on this rank's guidance branch and gathers the other rank's (module docstring)."""

        def __init__(self) -> None:
            super().__init__(dict(inner.config), inner.input_names, inner.output_name, inner.dtype, inner.device)
            self.inner, self.rank, self.mode = inner, rank, mode
            self.calls = 0
            self.bytes_sent = 0  # what this rank sent its peer, over the run
            self._context = "cond"
            self._pair: tuple[Any, Any] | None = None  # sequential: (cond, uncond) of the current step

        @contextlib.contextmanager
        def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
            previous, self._context = self._context, name
            with self.inner.cache_context(name, **kwargs):
                try:
                    yield
                finally:
                    self._context = previous

        def begin_run(self, num_steps: int) -> None:
            if hasattr(self.inner, "begin_run"):
                self.inner.begin_run(num_steps)

        def cache_stats(self) -> Any:
            return self.inner.cache_stats() if hasattr(self.inner, "cache_stats") else None

        def forward(self, return_dict: bool = True, **kwargs: Any) -> Any:
            import torch

            fault_point(fault_rank, self.calls)
            self.calls += 1
            if self.mode == "batched":
                out = self._batched(kwargs)
            elif self._context == "uncond":
                if self._pair is None:
                    raise DtcError("parallel cfg: the pipeline made an unconditional call before a conditional one")
                out, self._pair = self._pair[1], None
            else:
                mine = self.inner(return_dict=False, **kwargs)[0]
                both = self._gather(mine)
                self._pair = (both[0], both[1])
                out = both[0]
            if self.trace is not None:
                self.trace.append(out.detach().clone())
            assert isinstance(out, torch.Tensor)
            return (out,) if not return_dict else {"sample": out}

        def _batched(self, kwargs: dict[str, Any]) -> Any:
            import torch

            batch = kwargs["hidden_states"].shape[0]
            if batch % 2:
                raise UnsupportedError(
                    f"parallel cfg: the pipeline called the denoiser with batch {batch}, not a doubled CFG batch; "
                    "run with a guidance scale above 1 or without --parallel"
                )
            half = batch // 2
            mine = {
                k: v[self.rank * half : (self.rank + 1) * half]
                if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch
                else v
                for k, v in kwargs.items()
            }
            return torch.cat(self._gather(self.inner(return_dict=False, **mine)[0]), dim=0)

        def _gather(self, tensor: Any) -> list[Any]:
            import torch
            import torch.distributed as dist

            tensor = tensor.contiguous()
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor, group=group)
            self.bytes_sent += tensor.numel() * tensor.element_size() * (len(parts) - 1)
            return parts

    return CfgParallelModule()


def swap_prompts(prompt: Any, negative: Any) -> tuple[Any, Any]:
    """Rank 1's (prompt, negative prompt) in sequential CFG: the negative prompt first ("" where none was given,
    the pipelines' own default), so its first call carries the unconditional branch."""
    if negative is None:
        negative = [""] * len(prompt) if isinstance(prompt, list) else ""
    return negative, prompt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int, world: int, port: int, job: Callable[[int], Any], out_dir: str, timeout_s: float, threads: int | None
) -> None:  # runs in the spawned ranks (tests/test_parallel.py runs it through them)
    import pickle

    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LOCAL_RANK": str(rank)})  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    init_ranks(timeout_s)
    try:
        result = job(rank)
    except DtcError as exc:
        result = exc
        if rank:
            print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
    if rank == 0 and out_dir:
        with open(Path(out_dir) / "result.pkl", "wb") as f:  # our own file, read back by run_parallel
            pickle.dump(result, f)
    import torch.distributed as dist

    dist.destroy_process_group()


def _follower_main(index: int, world: int, port: int, job: Callable[[int], Any], timeout_s: float,
                   threads: int | None) -> None:  # fmt: skip
    """Rank ``index + 1`` of a group whose rank 0 is the process that started it (``start_followers``)."""
    _rank_main(index + 1, world, port, job, "", timeout_s, threads)


@dataclass
class Followers:
    """Ranks 1.. of a group whose rank 0 is this process (``start_followers``): ``stop()`` ends them."""

    context: Any
    world: int

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.context.processes)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Tell the followers there is nothing more (a None request), then wait for them (terminate past it)."""
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([None], src=0)
        for p in self.context.processes:
            p.join(timeout_s)
            if p.is_alive():
                p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_followers(
    spec: ParallelSpec, job: Callable[[int], Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None
) -> Followers:
    """Make this process rank 0 of ``spec.world`` local ranks and spawn ranks 1.. running ``job(rank)`` (e.g. a
    loop answering the requests rank 0 broadcasts: ``dtcompile.runtime.session.follow_requests``)."""
    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.start_processes(_follower_main, args=(spec.world, port, job, timeout_s, threads), nprocs=spec.world - 1,
                             join=False, start_method="spawn")  # fmt: skip
    os.environ.update({"RANK": "0", "WORLD_SIZE": str(spec.world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LOCAL_RANK": "0"})  # fmt: skip
    init_ranks(timeout_s)
    return Followers(ctx, spec.world)


def run_parallel(
    spec: ParallelSpec, job: Callable[[int], Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None
) -> Any:
    """Run ``job(rank)`` on ``spec.world`` local ranks (spawned processes; ``threads``: torch's threads in each)
    and return rank 0's result; a rank that dies or fails ends every rank and raises DtcError naming it, and the
    collectives time out after ``timeout_s``. ``job`` must be picklable."""
    import pickle

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dtc-parallel-") as out_dir:
        ctx = mp.start_processes(
            _rank_main, args=(spec.world, _free_port(), job, out_dir, timeout_s, threads), nprocs=spec.world, join=False,
            start_method="spawn",
        )  # fmt: skip
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except mp.ProcessExitedException as exc:
            raise DtcError(
                f"parallel {spec.world} ranks: rank {exc.error_index} exited with code {exc.exit_code} during the "
                "request; every rank was stopped"
            ) from None
        except mp.ProcessRaisedException as exc:
            last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
            raise DtcError(
                f"parallel {spec.world} ranks: rank {exc.error_index} failed ({last.strip()}); every rank was stopped"
            ) from None
        with open(Path(out_dir) / "result.pkl", "rb") as f:
            result = pickle.load(f)  # noqa: S301 - rank 0 of this call wrote it, into our own temp folder
    if isinstance(result, DtcError):
        raise result
    return result
