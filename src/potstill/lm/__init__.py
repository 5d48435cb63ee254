"""Model plumbing that every part needs, whatever role the model plays (teacher, student, suspect).

- `loading`: model specs ('embedded', a model dir, a .gguf file) to a local directory; dtypes and
  CPU bf16 detection;
- `embedded`: the embedded SmolLM2-135M-Instruct GGUF (and the optional Gemma 3 270M), converted once to a
  cached model directory;
- `tokens`: tokenizer identity (vocabulary hash), pad id, chat-template ids, per-row sampling seeds and
  the bytes each token id spells;
- `engine`: the batched decode (`complete_ids`) and teacher-forcing (`score_ids`) engine, with
  `decode` (one run's rows and loop), `sampling` (per-row seeded inverse-CDF sampling), `kvslab`
  (the KV cache written in place) and `attention` (single-query decode attention on CPU);
- `types`: `SamplingParams` and `Completion`.

Nothing here imports `teachers`, `train`, `capture` or `guard`: they all import this.
"""
