"""Inference: a trained run rebuilt from its directory, and its encoders."""
