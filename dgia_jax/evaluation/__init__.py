"""Evaluation: evaluators built from config, the best-epoch policy, the field's retrieval figures."""
