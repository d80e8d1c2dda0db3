"""``dtc serve``: the app under uvicorn, with a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from dtcompile.core.errors import ArtifactError
from dtcompile.serve.app import ServerState, create_app
from dtcompile.serve.models import ServedModel, ServeOptions

log = logging.getLogger("dtcompile.serve")


def open_state(artifacts: Sequence[str | Path], options: ServeOptions, api_key: str | None) -> ServerState:
    """The state for these artifacts, read but not loaded (ArtifactError for a bad or duplicate one)."""
    if not artifacts:
        raise ArtifactError("no artifact to serve: pass one or more artifact folders")
    models = [ServedModel.open(a, options) for a in artifacts]
    for model in models:  # CFG-parallel ranks are started from the main thread (ServedModel.start_ranks)
        model.start_ranks(options)
    return ServerState(models, options, api_key)


def serve(state: ServerState, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; raises ArtifactError when a model fails to load."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On the first signal: stop taking requests and answer the queue 503, then uvicorn's own shutdown
        waits for the running requests. A second signal quits at once (``_exit_now``)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit:
                _exit_now(sig, state)
            log.info("signal %d: draining", sig)
            state.drain()
            self.should_exit = True  # not re-raised after shutdown: a drained server exits 0

    config = uvicorn.Config(
        create_app(lambda: state),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=int(state.options.request_timeout) + 5,
        log_config=None,  # dtc's logging format (the CLI set it up)
    )
    server = DrainingServer(config)

    def fatal(message: str) -> None:
        server.should_exit = True

    state.on_fatal = fatal
    try:
        server.run()
    finally:
        for model in state.models.values():  # CFG-parallel follower ranks end with the server
            if model.followers is not None:
                model.followers.stop()
    if state.load_error is not None:
        raise ArtifactError(f"serving stopped: {state.load_error}")


def _exit_now(sig: int, state: ServerState) -> None:
    """A second signal: exit at once with 128 + the signal. The worker thread may be inside an engine call;
    leaving through uvicorn's forced shutdown and the interpreter's exit cancels the lifespan task mid-await (a
    traceback) and runs the engine library's C++ destructors under the running call (an abort: SIGABRT and a
    core file), so the process ends here with ``os._exit`` once the log is flushed."""
    import os
    import sys

    log.warning("second signal %d: exiting now (%d image(s) running were abandoned)", sig, state.scheduler.running)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + sig)


def read_api_key(env: str | None) -> str | None:
    """The bearer token from environment variable ``env`` (None: no auth); UnsupportedError when unset."""
    import os

    if env is None:
        return None
    value = os.environ.get(env, "")
    if not value.strip():
        from dtcompile.core.errors import UnsupportedError

        raise UnsupportedError(f"--api-key-env {env}: that environment variable is not set or empty")
    return value.strip()
