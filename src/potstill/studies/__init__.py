"""Studies: experiments composed from the pipeline's stages, each writing JSON, a table and a PNG.

- transfer.py: `potstill study transfer` — tokens to reach a quality with KD, with CE on the
  teacher's text, and with CE on human references (no teacher), over seeds, with intervals;
- collapse.py: `potstill study collapse` — each generation's student teaches the next; diversity,
  fidelity to generation 0 and reference NLL per generation;
- budget.py: `potstill study budget` — recipes (compression, data, training) compared by held-out
  quality kept per CPU-minute at one budget per arm, Pareto front marked;
- stats.py (intervals, interpolation, bootstrap), common.py (measurements, ETA), report.py (outputs).
"""
