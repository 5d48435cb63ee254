"""The embedded default teacher's model files: moved to `potstill.lm.embedded` (model plumbing, not a teacher).

Re-exported here so existing imports keep working.
"""

from potstill.lm.embedded import EMBEDDED_NAME, convert_gguf, embedded_gguf, embedded_model_dir

__all__ = ["EMBEDDED_NAME", "convert_gguf", "embedded_gguf", "embedded_model_dir"]
