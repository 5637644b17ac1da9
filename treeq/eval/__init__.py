"""Measuring a model: perplexity, lm-eval-style tasks, speed, per-module error and comparison tables."""
