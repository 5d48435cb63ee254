"""Cross-tokenizer distillation, measured: a capture by teacher A -> a fresh student with tokenizer B.

    python -m potstill.bench.xtok --capture runs/cap --out runs/xtok --steps 300

Trains a byte-level BPE tokenizer (`--vocab`, default 4096) on the capture's train-split texts with
the `tokenizers` library (so its merges differ from the teacher's), builds one small random llama
with it, and trains copies of that same student from the capture with each `--losses` entry
(`ce` = the cross-tokenizer path with ce_weight 1, i.e. CE on the student's tokens of the teacher's
text only). Each student is measured on the held-out split: NLL of the teacher's text (per
student token and per UTF-8 byte, comparable across tokenizers) and the ULD / mapped-KL to the
teacher at aligned positions. Writes xtok.json, xtok.md and xtok.png (training CE per step).

Measured once (2026-11-28, shared 2-core CPU): the demo capture of SmolLM2-135M-Instruct (148 train /
26 held-out rows, 96 tokens max, top-20 `mass` codec), a 3.4M-parameter student with a 4096-token
BPE, 200 steps of 8 rows, lr 3e-3, seeds 0 / 1. Held-out NLL of the teacher's text per byte:
init 2.79 / 2.80, CE only 2.40 / 2.48, uld 2.40 (seed 0), uld_kl 2.32 / 2.33 (the teacher: 0.68).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def small_llama(tokenizer, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def measure(model_dir: Path, capture, teacher_tok) -> dict[str, Any]:
    """Held-out NLL of the teacher's text and ULD / mapped KL at aligned positions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.train.data import student_logits
    from potstill.train.uld import mapped_kl, uld_loss
    from potstill.train.xtok import text_nll, xtok_collate, xtok_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, stats = xtok_examples(capture.rows(split="heldout"), tok, teacher_tok)
    out = text_nll(model, examples, tok.pad_token_id)
    uld = kl = aligned = 0.0
    with torch.no_grad():
        for s in range(0, len(examples), 8):
            batch = xtok_collate(examples[s : s + 8], tok.pad_token_id)
            z = student_logits(model, batch)[batch.kd_pos]
            uld += float(uld_loss(z, batch.topk_logprobs, batch.tail_logprob).sum())
            kl += float(mapped_kl(z, batch.topk_logprobs, batch.tail_logprob, batch.mapped_ids).sum())
            aligned += len(batch.kd_pos)
    return {**out, "uld": uld / aligned, "mapped_kl": kl / aligned, "aligned_fraction": stats["aligned_fraction"],
            "rows": stats["rows"]}


def run(capture_dir: str, out: str, losses: list[str], steps: int, vocab: int, hidden: int, layers: int,
        teacher: str = "embedded", lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
        log=print) -> dict[str, Any]:
    from potstill.capture.store import Capture
    from potstill.config import TrainConfig
    from potstill.train.loop import train
    from potstill.train.xtok import load_teacher_tokenizer
    from potstill.utils import write_json

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    capture = Capture.open(capture_dir)
    teacher_tok = load_teacher_tokenizer(capture.manifest, teacher, capture_dir)
    texts = []
    for row in capture.rows(split="train", columns=["prompt", "completion_text"]):
        texts += [m["content"] for m in row["prompt"]] + [row["completion_text"]]
    tok = train_tokenizer(texts, vocab)
    init = out_dir / "init"
    model = small_llama(tok, hidden, layers, seed=seed)
    model.save_pretrained(init)
    tok.save_pretrained(init)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"student tokenizer: {len(tok)} tokens (teacher {len(teacher_tok)}); student {n_params / 1e6:.2f}M params")
    results: dict[str, Any] = {"capture": capture_dir, "student_vocab": len(tok), "teacher_vocab": len(teacher_tok),
                               "student_params": n_params, "steps": steps, "seed": seed, "runs": {"init": measure(init, capture,
                                                                                                   teacher_tok)}}
    curves = {}
    for loss in losses:
        kind, ce_weight = ("uld", 1.0) if loss == "ce" else (loss, 0.5)
        cfg = TrainConfig(capture=capture_dir, out=str(out_dir / loss), student=f"pretrained:{init}", teacher=teacher,
                          loss=kind, ce_weight=ce_weight, max_steps=steps, batch_size=batch_size, lr=lr,
                          warmup_steps=max(1, steps // 20), checkpoint_every=0, max_seq_len=384, seed=seed)
        summary = train(cfg, log=lambda line, name=loss: None if _quiet_step(line, steps) else log(f"{name}: {line}"))
        results["runs"][loss] = {**measure(out_dir / loss, capture, teacher_tok),
                                 "train_tokens_per_s": summary["train_tokens_per_s"]}
        curves[loss] = [json.loads(ln) for ln in (out_dir / loss / "metrics.jsonl").read_text().splitlines()]
    write_json(out_dir / "xtok.json", {**results, "curves": {k: [(m["step"], m["ce"], m["kd"]) for m in v]
                                                             for k, v in curves.items()}})
    (out_dir / "xtok.md").write_text(format_table(results) + "\n")
    plot(curves, out_dir / "xtok.png")
    return results


def _quiet_step(line: str, steps: int) -> bool:
    """Let through one training step line in ten (and every other line)."""
    if not line.startswith("step "):
        return False
    step = int(line.split()[1].split("/")[0])
    return step % max(1, steps // 10) != 0


def format_table(results: dict[str, Any]) -> str:
    from potstill.present import markdown_table

    rows = [[name, f"{r['nll_per_token']:.4f}", f"{r['nll_per_byte']:.4f}", f"{r['uld']:.4f}", f"{r['mapped_kl']:.4f}",
             f"{r['aligned_fraction']:.1%}"] for name, r in results["runs"].items()]
    return markdown_table(["student", "held-out NLL / token", "NLL / byte", "ULD to teacher", "mapped KL", "aligned"], rows)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    from potstill.utils import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["ce"] for r in rows], label=f"{name}: train CE / student token")
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capture", required=True)
    p.add_argument("--out", default="runs/xtok")
    p.add_argument("--teacher", default="embedded", help="model dir whose tokenizer made the capture")
    p.add_argument("--losses", default="ce,uld,uld_kl", help="comma-separated: ce, uld, uld_kl")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="student init and data order")
    args = p.parse_args()
    results = run(args.capture, args.out, args.losses.split(","), args.steps, args.vocab, args.hidden, args.layers,
                  teacher=args.teacher, lr=args.lr, seed=args.seed)
    print(format_table(results))


if __name__ == "__main__":
    main()
