"""Plugins that serve custom ONNX nodes in engine builds (``fused_attention``: the ``dtc::FusedAttention`` node).

Self-contained: a plugin imports nothing else from dtcompile, and ``dtcompile.attention`` loads it on first use.
"""
