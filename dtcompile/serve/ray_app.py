"""The same app as a Ray Serve deployment: one replica per GPU (or CPU slot), Ray's routing and autoscaling.

``dtc serve --ray N ARTIFACT...`` starts (or joins, with ``RAY_ADDRESS``) a Ray cluster and runs N replicas;
a Ray Serve config file can name ``dtcompile.serve.ray_app:app_builder`` instead (docs/serving.md). Each
replica is its own process with its own ``ServerState`` (models, queue, worker, metrics).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import asdict
from typing import Any

from dtcompile.serve.app import ServerState, create_app
from dtcompile.serve.models import ServeOptions

log = logging.getLogger("dtcompile.serve")
_REPLICA: dict[str, ServerState] = {}  # this replica process's state, set by the deployment's constructor


def _replica_state() -> ServerState:
    from dtcompile.serve.protocol import APIError

    if "state" not in _REPLICA:
        raise APIError(503, "the replica is starting")
    return _REPLICA["state"]


def deployment(
    artifacts: list[str],
    options: ServeOptions,
    api_key: str | None,
    *,
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    actor_options: dict[str, Any] | None = None,
) -> Any:
    """A bound Ray Serve application (``serve.run`` it); ``autoscaling`` is Ray's autoscaling_config."""
    from ray import serve

    app = create_app(_replica_state, autoload=False)
    if actor_options is None:
        actor_options = {"num_gpus": 1} if _cluster_gpus() else {"num_cpus": 1}
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}

    @serve.deployment(
        name="dtc", ray_actor_options=actor_options, max_ongoing_requests=options.max_queue + options.max_batch, **scale
    )
    @serve.ingress(app)
    class DtcReplica:
        def __init__(self, artifacts: list[str], options: dict[str, Any], api_key: str | None) -> None:
            from dtcompile.serve import (
                ray_app,
            )  # the module itself: this class was pickled by value, its globals copied
            from dtcompile.serve.server import open_state

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s")
            state = open_state(artifacts, ServeOptions(**options), api_key)
            state.load()  # Ray marks the replica healthy once the constructor returns
            ray_app._REPLICA["state"] = state

        def check_health(self) -> None:
            from dtcompile.serve import ray_app

            state = ray_app._REPLICA.get("state")
            if state is None or state.load_error:
                raise RuntimeError("not loaded")

        def __del__(self) -> None:
            from dtcompile.serve import ray_app

            state = ray_app._REPLICA.pop("state", None)
            if state is not None:
                state.drain()

    # mypy keeps a decorated class's own type (python/mypy#3135); serve.deployment made it a Deployment
    return DtcReplica.bind(list(artifacts), asdict(options), api_key)  # type: ignore[attr-defined]


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run dtcompile.serve.ray_app:app_builder artifacts=a,b replicas=2`` (Ray's app-builder hook)."""
    import os

    artifacts = [a for a in str(args.get("artifacts", "")).split(",") if a]
    fields = {k: type(v)(args[k]) for k, v in asdict(ServeOptions()).items() if k in args}
    key_env = args.get("api_key_env")
    return deployment(
        artifacts,
        ServeOptions(**fields),
        os.environ.get(key_env) if key_env else None,
        replicas=int(args.get("replicas", 1)),
    )


def run_ray(artifacts: list[str], options: ServeOptions, api_key: str | None, *, host: str, port: int,
            replicas: int) -> None:  # fmt: skip
    """Start Ray Serve with ``replicas`` replicas on host:port and block until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    from dtcompile.serve.server import open_state

    open_state(artifacts, options, api_key)  # bad artifacts fail here, before Ray starts
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(artifacts, options, api_key, replicas=replicas), name="dtc", route_prefix="/")
    log.info("serving on http://%s:%d/v1 with %d Ray Serve replica(s)", host, port, replicas)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down Ray Serve")
    serve.shutdown()
    ray.shutdown()


def _cluster_gpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0))
