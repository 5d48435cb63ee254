"""Benchmarks: each writes a JSON result and measures against anchors run in the same process.

- `codec.py`: bytes per completion token and KL fidelity of each top-k codec (`potstill bench codec`).
- `watermark.py`: watermark detection power, false positives and quality cost.
- `train.py` (+ `train_arms.py`): potstill's trainer vs TRL's GKDTrainer, same budget (`potstill bench train`).
"""
