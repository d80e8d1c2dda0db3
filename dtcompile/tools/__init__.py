"""Tools over built artifacts: ``refit`` (LoRA swap), ``bench`` (latency and memory next to PyTorch), ``publish``
(per-arch archives to a store, and pull)."""
