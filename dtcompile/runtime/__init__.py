"""Runtime: engine-backed components and the denoising loop (diffusers' own pipelines, unchanged)."""
