"""`dtc` command line: a click group whose subcommands are imported only when chosen."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Any

import click

from dtcompile.core.errors import DtcError
from dtcompile.core.versions import DTC_VERSION as __version__

# name -> ("module:function", one-line help); the module is imported only when the command runs.
COMMANDS = {
    "cache": ("dtcompile.cli.cache:cache", "Block-cache tools: fit TeaCache's polynomial for an artifact."),
    "build": ("dtcompile.cli.build:build", "Build an artifact (ONNX + engines + manifest) from a recipe."),
    "run": ("dtcompile.cli.run:run", "Generate an image with a built artifact."),
    "inspect": ("dtcompile.cli.inspect:inspect_cmd", "Print an artifact's manifest."),
    "models": ("dtcompile.cli.models:models", "List the built-in tiny pipelines."),
    "publish": ("dtcompile.cli.publish:publish", "Publish an artifact's per-arch archives to a folder or URL."),
    "pull": ("dtcompile.cli.pull:pull", "Fetch, verify and unpack one arch of a published artifact."),
    "bench": ("dtcompile.cli.bench:bench", "Measure latency and memory of an artifact next to PyTorch."),
    "refit": ("dtcompile.cli.refit:refit", "Swap LoRA weights into a built artifact without rebuilding it."),
    "serve": ("dtcompile.cli.serve:serve", "Serve artifacts behind an OpenAI-compatible image API."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[cmd_name][0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text from the table, so `dtc --help` imports no subcommand module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtc")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (no progress bars or lines).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """dtcompile: diffusers pipelines -> quantized TensorRT engines, reproducibly."""
    ctx.ensure_object(dict)["debug"] = debug
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if quiet:
        set_quiet()


def set_quiet() -> None:
    """Only warnings and errors from here on (``dtc -q``, ``dtc build --quiet``): no stage lines, and no progress
    bars or lines either (``dtcompile.core.progress.Progress`` draws only while the log shows INFO)."""
    logging.getLogger().setLevel(logging.WARNING)


#: Set by the first Ctrl-C or SIGTERM: a command a library let finish (it swallowed the KeyboardInterrupt, or it
#: arrived while a swap held it back) still exits 130, never 0.
_INTERRUPTED: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _from_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` was raised because of a Ctrl-C or SIGTERM (a library wrapped the KeyboardInterrupt into
    its own error type, e.g. a lazy import's "failed to import"), or after one."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return bool(_INTERRUPTED)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: every error is one line on stderr (traceback with --debug).

    Exit codes: DtcError 2 (or its own), OSError 1, interrupt 130, anything else (a bug) 70.
    """
    args = sys.argv[1:] if argv is None else argv
    # diffusers/transformers chatter (progress bars, optional-backend notices) stays out of dtc's output.
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C: temp folders are removed
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _terminate)
    try:
        result = cli.main(args=args, prog_name="dtc", standalone_mode=False)
    except Exception as exc:  # KeyboardInterrupt and SystemExit are not Exceptions: handled below or passed on
        _exit_for(exc, args)
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if _INTERRUPTED:  # the command finished although a signal came (a library swallowed the KeyboardInterrupt)
        click.echo("interrupted", err=True)
        sys.exit(130)
    return result


def _exit_for(exc: Exception, args: list[str]) -> None:
    """Print ``exc`` as one ``error:`` line and exit with its code; returns (to re-raise) only with --debug."""
    if isinstance(exc, click.exceptions.Exit):
        sys.exit(130 if _INTERRUPTED and exc.exit_code == 0 else exc.exit_code)
    if isinstance(exc, click.UsageError):  # one line, like every other error, with where to look
        where = exc.ctx.command_path if exc.ctx is not None else "dtc"
        click.echo(f"error: {exc.format_message()} (see: {where} --help)", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, click.ClickException):
        exc.show()
        sys.exit(exc.exit_code)
    if isinstance(exc, click.exceptions.Abort) or _from_interrupt(exc):
        # a library may wrap the Ctrl-C into its own error (a lazy import's "failed to import"): still an interrupt
        click.echo("interrupted", err=True)
        sys.exit(130)
    if "--debug" in args:
        return
    if isinstance(exc, DtcError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, OSError):  # the machine, not the input: full or read-only disk, a path that is a file, ...
        # a copy names its source first: "src -> dst" says which side failed to write
        where = f"{exc.filename} -> {exc.filename2}: " if exc.filename2 else f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    # a bug: still one line, the traceback with --debug
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    click.echo(f"error: internal error {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
    sys.exit(70)
