"""Retrieval over exports: the export layout, the one searcher, the visual report, the search service."""
