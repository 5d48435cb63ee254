"""The capture: prompts in, teacher completions with top-k log-probs out, as Parquet shards + manifest.

- `prompts.py`: load prompts (JSONL / Parquet / built-in seed tasks), de-duplicate, split.
- `codec.py`: top-k log-prob encodings ("mass", "f16", "f32", "none") and their fidelity.
- `store.py`: the resumable shard writer (`CaptureWriter`) and the verifying reader (`Capture`).
- `generate.py`: `potstill generate`, which ties them to a teacher.
"""
