"""A run on disk: its directory, metric records and curves, checkpoints, files written whole."""
