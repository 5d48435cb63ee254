"""Model plumbing that every part needs, whatever role the model plays (teacher, student, suspect).

- `loading`: model specs ('embedded', a model dir, a .gguf file) to a local directory; dtypes and
  CPU bf16 detection;
- `embedded`: the embedded SmolLM2-135M-Instruct GGUF, converted once to a cached model directory;
- `tokens`: tokenizer identity (vocabulary hash), pad id, chat-template ids and per-row sampling seeds.

Nothing here imports `teachers`, `train`, `capture` or `guard`: they all import this.
"""
