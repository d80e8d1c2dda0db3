"""`dtc serve`: OpenAI-compatible image generation over built artifacts (docs/serving.md).

``app`` (routes, ``ServerState``), ``scheduler`` (queue, batching, worker), ``models`` (one served artifact),
``protocol`` (wire format and errors), ``metrics``, ``store`` (url images), ``server`` (uvicorn) and
``ray_app`` (Ray Serve). Nothing here is imported by ``dtc --help``.
"""
