"""potstill: distil language models, and tell model owners when theirs was distilled."""

__version__ = "0.1.0"
