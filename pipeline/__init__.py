"""Curate: distributed curation of image-text pretraining data."""

__version__ = "0.1.0"
