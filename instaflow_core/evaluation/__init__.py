"""Evaluation: metrics (Frechet distance, CLIP score, latency), feature networks with honest labels, the
evaluation set (COCO or holdout prompts), the samplers under test, and the promotion gate."""
