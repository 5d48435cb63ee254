"""Training: distillation losses (losses.py), capture -> batches (data.py) and the training loop (loop.py)."""
