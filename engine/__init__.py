"""winnow: stream, clean, deduplicate, score and select supervised fine-tuning data."""

__version__ = "0.1.0"
