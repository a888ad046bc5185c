"""Inference: the one-step / N-step `InstaFlowPipeline` and image helpers (decode, grids, PNG)."""
