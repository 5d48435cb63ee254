"""Typed configs for each stage: one home per setting, with its help text.

Each field carries its help in `metadata["help"]`; the CLI derives its flags from these
dataclasses, and YAML recipes map onto them (`load_recipe`). The resolved config is saved
next to every artefact.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from potstill.errors import PotstillError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def derive(source: type, name: str, default: Any = dataclasses.MISSING, note: str = "") -> Any:
    """A field declared in `source` (e.g. GenerateConfig.max_new_tokens), reused by another config.

    Its help is the source's (+ `note`); its default is the source's unless `default` states this
    config's own choice, recorded in the field's metadata (`derived_from`, `overrides`) so a test can
    tell a stated override from a second, drifting declaration.
    """
    src = next((f for f in fields(source) if f.name == name), None)
    if src is None:
        raise TypeError(f"{source.__name__} has no field {name!r}")
    own = src.default if src.default is not dataclasses.MISSING else src.default_factory()  # type: ignore[misc]
    value = own if default is dataclasses.MISSING else default
    helptext = src.metadata.get("help", "") + (f" {note}" if note else "")
    metadata = {"help": helptext, "derived_from": (source, name), "overrides": value != own}
    if isinstance(value, list | dict):
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=value, metadata=metadata)


@dataclass
class HttpConfig:
    """An HTTP teacher's options (teachers/http.py), declared once: `potstill generate --http-…` and a
    recipe's `generate:` section reach them; HTTPTeacher's own defaults are these."""

    http_endpoint: str = opt("chat", "HTTP teacher endpoint: 'chat' (/chat/completions) or 'completions'.")
    http_api_key_env: str | None = opt(
        "OPENAI_API_KEY", "Environment variable holding the HTTP teacher's API key (sent as a Bearer token; '' = none)."
    )
    http_concurrency: int = opt(8, "HTTP requests in flight at once (for the whole teacher).")
    http_rate_limit_rps: float | None = opt(None, "Pace HTTP requests to at most this many per second (client side).")
    http_max_retries: int = opt(6, "Retries of an HTTP request on 429/408/5xx/timeouts (backoff, Retry-After honoured).")
    http_timeout: float = opt(120.0, "Seconds before one HTTP request times out (then it is retried).")
    http_backoff_base: float = opt(0.5, "First retry waits up to this many seconds (doubling, full jitter).")
    http_backoff_max: float = opt(60.0, "Longest backoff between HTTP retries, in seconds.")
    http_max_top_logprobs: int = opt(20, "Most top log-probs asked of the server per token (servers cap it, often at 20).")
    http_cache: bool = opt(False, "Cache successful HTTP responses on disk: an identical request is not sent twice.")
    http_cache_dir: str = opt("runs/http_cache", "Directory of the HTTP response cache (with --http-cache).")
    http_extra_body: dict[str, Any] | None = opt(
        None, "JSON object merged into every HTTP request body (e.g. '{\"n_probs\": 20}' for old llama.cpp)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.http_extra_body, str):
            import json

            try:
                self.http_extra_body = json.loads(self.http_extra_body)
            except ValueError as e:
                raise PotstillError(f"http_extra_body: not JSON ({e})") from None
        if self.http_extra_body is not None and not isinstance(self.http_extra_body, dict):
            raise PotstillError(f"http_extra_body: expected a JSON object, got {self.http_extra_body!r}")
        if self.http_endpoint not in ("chat", "completions"):
            raise PotstillError(f"http_endpoint must be 'chat' or 'completions', not {self.http_endpoint!r}")

    def http_teacher_kwargs(self) -> dict[str, Any]:
        """The HTTPTeacher keyword arguments these options stand for."""
        return {
            "endpoint": self.http_endpoint,
            "api_key_env": self.http_api_key_env or None,
            "concurrency": self.http_concurrency,
            "rate_limit_rps": self.http_rate_limit_rps,
            "max_retries": self.http_max_retries,
            "timeout": self.http_timeout,
            "backoff_base": self.http_backoff_base,
            "backoff_max": self.http_backoff_max,
            "max_top_logprobs": self.http_max_top_logprobs,
            "cache_dir": self.http_cache_dir if self.http_cache else None,
            "extra_body": self.http_extra_body,
        }


@dataclass
class AntidistillConfig:
    """Anti-distillation sampling (guard/antidistill.py): one declaration for `generate` and `serve`."""

    antidistill: float = opt(
        0.0, "Anti-distillation tilt lambda: sample from teacher logits + lambda * Delta, Delta = how much a proxy "
        "student's loss on --protect would rise from training on each token (0 = off).")
    proxy: str | None = opt(None, "Anti-distillation proxy student (model dir or .gguf; the teacher's tokenizer).")
    protect: str | None = opt(None, "Prompts with reference answers whose proxy loss anti-distillation protects.")
    antidistill_eps: float = opt(1e-3, "Finite-difference step along the unit gradient of the protect loss.")

    def __post_init__(self) -> None:
        if not (self.antidistill >= 0 and self.antidistill_eps > 0):
            raise PotstillError(f"antidistill must be >= 0 and antidistill_eps > 0, got {self.antidistill}, "
                                f"{self.antidistill_eps}")
        if self.antidistill > 0 and not (self.proxy and self.protect):
            raise PotstillError("--antidistill needs --proxy DIR and --protect FILE")

    def antidistill_config(self) -> AntidistillConfig | None:
        """These settings alone, or None when anti-distillation is off."""
        if not self.antidistill:
            return None
        return AntidistillConfig(self.antidistill, self.proxy, self.protect, self.antidistill_eps)


@dataclass
class GenerateConfig(HttpConfig, AntidistillConfig):
    teacher: str = opt("embedded", "Teacher: 'embedded', a model dir, a .gguf file or an http(s)://…/v1 URL.")
    model: str | None = opt(None, "Model name to request from an HTTP teacher.")
    tokenizer: str | None = opt(None, "Tokenizer (model dir) that maps an HTTP teacher's tokens to ids.")
    prompts: str | None = opt(
        None, "Prompts file (JSONL/Parquet: messages, or instruction [+input] [+output]); 'builtin:seed_tasks', "
        "'builtin:heldout_v1'."
    )
    self_instruct: int = opt(0, "Let the teacher write N prompts itself (Magpie-style) instead of --prompts.")
    out: str = opt("runs/capture", "Capture directory (created; an existing one is resumed).")
    max_new_tokens: int = opt(128, "Most completion tokens per prompt.")
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    top_k: int = opt(20, "Top log-probs kept per completion token (cap when the codec is 'mass').")
    codec: str = opt("mass", "Top-k codec: 'mass' (adaptive k, quantised, compact) or 'f16'.")
    samples: int = opt(1, "Completions per prompt.")
    batch_size: int = opt(64, "Prompts decoded together (local teachers keep this many rows decoding).")
    heldout: float = opt(0.1, "Fraction of prompts held out for eval (seeded split, recorded in the manifest).")
    max_prompts: int | None = opt(None, "Use at most this many prompts (after de-duplication).")
    seed: int = opt(0, "Seed for sampling and the split.")
    dtype: str = opt("auto", "Teacher dtype: auto (bf16 where the CPU has it), float32, bfloat16.")
    quantize: str = opt(
        "none", "Local teacher's decoder-layer linears: 'none' or 'int8' (int8 weights and per-token activations, "
        "float32 on the CPU; refused when its top-k KL to float32 on a calibration batch exceeds --quantize-max-kl; "
        "in the manifest).")
    quantize_max_kl: float = opt(1e-3, "The int8 fidelity bar, nats/token of top-k KL to the float32 teacher "
                                 "(raise it knowingly: the embedded teacher's int8 measures ~0.01).")
    shard_rows: int = opt(256, "Rows per Parquet shard (a killed run resumes at shard granularity).")
    answers: str = opt(
        "sample",
        "'sample': the teacher writes the answers; 'reference': the teacher scores the prompts' own "
        "reference answers (teacher forcing at prefill speed, no sampling).",
    )

    def __post_init__(self) -> None:
        HttpConfig.__post_init__(self)
        AntidistillConfig.__post_init__(self)
        if not self.prompts and not self.self_instruct:
            raise PotstillError("generate: give --prompts FILE or --self-instruct N")
        if self.top_k < 0 or self.batch_size < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise PotstillError("generate: top_k >= 0, batch_size >= 1, samples >= 1, max_new_tokens >= 1")
        if not 0 <= self.heldout < 1:
            raise PotstillError("generate: heldout must be in [0, 1)")
        if self.answers not in ("sample", "reference"):
            raise PotstillError(f"generate: answers must be 'sample' or 'reference', not {self.answers!r}")
        if self.answers == "reference" and (self.samples != 1 or self.self_instruct):
            raise PotstillError("generate: --answers reference scores each prompt's one reference (samples 1, no self-instruct)")
        if self.quantize not in ("none", "int8") or self.quantize == "int8" and (
                self.dtype in ("bfloat16", "float16") or self.teacher.startswith(("http://", "https://"))):
            raise PotstillError(f"generate: quantize must be 'none' or 'int8' (int8: a local float32 teacher), not "
                                f"{self.quantize!r} with dtype {self.dtype!r}")
        if not self.quantize_max_kl > 0:
            raise PotstillError(f"generate: quantize_max_kl must be > 0, not {self.quantize_max_kl}")


MODES = ("offline", "online", "on-policy")


def check_modes(cfg) -> None:
    """Cross-field checks of TrainConfig's mode settings (called from its __post_init__; train/online.py runs the modes)."""
    if cfg.mode not in MODES:
        raise PotstillError(f"train: mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if not 0.0 <= cfg.lmbda <= 1.0:
        raise PotstillError(f"train: lmbda must be in [0, 1], got {cfg.lmbda!r}")
    if cfg.online_k < 1:
        raise PotstillError(f"train: online_k must be >= 1, got {cfg.online_k!r}")
    if cfg.hidden_weight < 0:
        raise PotstillError(f"train: hidden_weight must be >= 0, got {cfg.hidden_weight!r}")
    if cfg.hidden_weight > 0 and cfg.mode == "offline":
        raise PotstillError(
            "train: --hidden-weight needs the teacher's hidden states, which a capture does not store; "
            "use --mode online or --mode on-policy"
        )


@dataclass
class TrainConfig:
    capture: str = opt("runs/capture", "Capture directory to learn from.")
    out: str = opt("runs/student", "Output directory for the student (HF format) and its metrics.")
    teacher: str = opt(
        "embedded", "Teacher whose weights/tokenizer seed the student (prune/fresh); the live teacher in online modes."
    )
    student: str = opt(
        "prune:depth:0.5",
        "Student: prune:depth[:N|ratio], prune:width[:ratio|params], moe:upcycle[:E[:K[:noise]]] "
        "(join steps with '+', run depth -> width -> moe), fresh:<size>, pretrained:<path>.",
    )
    loss: str = opt("fkl", "Loss: ce, fkl, rkl, jsd, skl, srkl, tvd; cross-tokenizer: uld, uld_kl.")
    temperature: float = opt(1.0, "Distillation temperature.")
    beta: float = opt(0.5, "JSD interpolation beta.")
    alpha: float = opt(0.1, "Skew for skl / srkl.")
    ce_weight: float = opt(0.0, "Weight of hard-label CE mixed with the KD loss (0..1).")
    lr: float = opt(3e-4, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(10, "Linear warm-up steps before cosine decay.")
    max_steps: int = opt(100, "Optimizer steps.")
    batch_size: int = opt(8, "Sequences per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_seq_len: int = opt(512, "Truncate prompt+completion to this many tokens.")
    grad_clip: float = opt(1.0, "Gradient-norm clip (0 = off).")
    bf16: str = opt("auto", "bf16 autocast: auto (where the CPU/GPU supports it), on, off.")
    checkpoint_every: int = opt(50, "Save a resumable checkpoint every N steps (0 = only at the end).")
    resume: bool = opt(False, "Continue from the latest checkpoint in --out.")
    calibration: int = opt(32, "Calibration prompts for pruning.")
    seed: int = opt(0, "Seed for data order and fresh initialisation.")
    chunk_size: int | None = opt(None, "Compute the loss over this many positions at a time (bounds memory).")
    mode: str = opt(
        "offline",
        "offline (the capture's stored top-k), online (the live --teacher scores every batch), or on-policy "
        "(GKD: a seeded --lmbda share of batches are completions sampled from the student, scored by the teacher).",
    )
    lmbda: float = opt(0.5, "on-policy: fraction of micro-batches whose completions the student samples (0..1).")
    online_k: int = opt(64, "online/on-policy: teacher top-k taken from its live logits (+ tail bucket).")
    teacher_dtype: str = opt("float32", "online/on-policy: live teacher dtype: float32, bfloat16 or auto.")
    sample_max_new_tokens: int | None = opt(None, "on-policy: most sampled tokens per completion (default: the capture's).")
    sample_temperature: float | None = opt(None, "on-policy: student sampling temperature (default: the capture's).")
    hidden_weight: float = opt(
        0.0, "Weight of the hidden-state loss (student layer vs its teacher layer, learned projection); needs online/on-policy."
    )
    health_steps: int = opt(10, "Warn if the weighted KD term is under 1% of the weighted CE term over this many first steps.")
    dist: str = opt("auto", "Under torchrun/accelerate launch: ddp, fsdp (FSDP2), or auto (= ddp).")
    grad_checkpointing: bool = opt(False, "Recompute layer activations in backward (less memory, slower).")
    lr_schedule: str = opt("cosine", "After warm-up: cosine (decay to 10% at max_steps) or constant.")
    freeze_embeddings: bool = opt(False, "Keep the token embedding (and an output head tied to it) as built: not trained.")
    packing: bool = opt(True, "Pack each micro-batch's sequences into as few rows as fit (position ids keep them apart) "
                        "instead of padding each to the longest: the same loss, without computing padding.")

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise PotstillError(f"train: lr_schedule must be cosine/constant, not {self.lr_schedule!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise PotstillError("train: max_steps, batch_size and grad_accum must be >= 1")
        if self.bf16 not in ("auto", "on", "off"):
            raise PotstillError(f"train: bf16 must be auto/on/off, not {self.bf16!r}")
        check_modes(self)
        if self.dist not in ("auto", "ddp", "fsdp"):
            raise PotstillError(f"train: dist must be auto/ddp/fsdp, not {self.dist!r}")


@dataclass
class EvalConfig:
    capture: str = opt("runs/capture", "Capture whose held-out split is the test set.")
    students: list[str] = opt([], "Student model directories to evaluate.")
    teacher: str = opt("embedded", "Teacher model (for its own row and reference NLL).")
    out: str = opt("runs/eval", "Where eval.json and eval.md go.")
    prompts: str | None = opt(None, "Extra prompts file with reference answers (NLL of references).")
    split: str = opt("heldout", "Capture split to evaluate on.")
    max_rows: int | None = opt(None, "Evaluate at most this many capture rows.")
    gen_prompts: int = opt(16, "Prompts for the generation-speed measurement.")
    gen_tokens: int = opt(64, "Tokens per prompt for the speed measurement.")
    batch_size: int = opt(8, "Batch size for scoring and generation.")
    labels: list[str] = opt([], "Row labels for the students (default: directory names).")
    tasks: list[str] = opt([], "Multiple-choice task JSONL files or builtin:potstill_mc; adds accuracy and % kept.")
    heldout_prompts: str | None = opt(
        None, "Held-out quality set from another source than the training prompts, with reference answers "
        "(builtin:heldout_v1): top-1 agreement, KL and reference likelihood kept on its answers; its prompts "
        "also feed the greedy answers scored for repetition.")


STAGES = {"generate": GenerateConfig, "train": TrainConfig, "eval": EvalConfig}


def help_of(cls, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def build(cls, values: dict[str, Any], where: str):
    """Instantiate a config from a dict, naming unknown fields and bad values.

    Each value is first validated into its field's declared type (`coerce`), so a YAML `lr: 1e-4`
    (a string under YAML 1.1) or `--set train.lr=3e-4` reaches the stage as a float.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PotstillError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})", where=where)
    hints = typing.get_type_hints(cls)
    typed = {k: coerce(v, hints[k], k, where) for k, v in values.items()}
    try:
        return cls(**typed)
    except TypeError as e:
        raise PotstillError(str(e), where=where) from None
    except PotstillError as e:
        if e.where is None:
            raise PotstillError(str(e), where=where) from None
        raise


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    """`value` as the type `tp` (int, float, bool, str, X | None, list[X]); a one-line error naming `name` if not."""

    def bad(expected: str) -> PotstillError:
        return PotstillError(f"{name}: expected {expected}, got {value!r}", where=where)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value  # a union of several types: left to the config's own checks
        return coerce(value, rest[0], name, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad("a list")
        item = args[0] if args else Any
        return [coerce(v, item, name, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise bad(_TYPE_NAMES[bool])
    if tp is int:
        if isinstance(value, bool):
            raise bad(_TYPE_NAMES[int])
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is None or not number.is_integer():
            raise bad(_TYPE_NAMES[int])
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise bad(_TYPE_NAMES[float])
        number = _number(value)
        if number is None:
            raise bad(_TYPE_NAMES[float])
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off/yes/no as a boolean
            raise bad("a string (quote it in YAML)")
        if isinstance(value, int | float):
            return str(value)
        raise bad(_TYPE_NAMES[str])
    return value


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=10' -> (['train', 'max_steps'], 10) with YAML typing of the value."""
    key, sep, value = text.partition("=")
    if not sep:
        raise PotstillError(f"override {text!r}: expected stage.field=value")
    return key.split("."), yaml.safe_load(value)


def load_recipe(path: str | Path, overrides: list[str] = (), stages: dict[str, type] | None = None) -> dict[str, Any]:
    """Read a YAML recipe {run_dir, generate, train, eval} (or the given `stages`: section -> config class)
    and apply stage.field=value overrides; unknown sections and fields are refused."""
    stages = STAGES if stages is None else stages
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise PotstillError(f"cannot read recipe: {e.strerror}", where=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PotstillError(f"invalid YAML: {getattr(e, 'problem', e)}", where=f"{path}{line}") from None
    if not isinstance(data, dict):
        raise PotstillError("a recipe is a mapping of stages", where=str(path))
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    allowed = {"run_dir", "name", "eval_before", *stages}
    bad = sorted(set(data) - allowed)
    if bad:
        raise PotstillError(f"unknown section {bad[0]!r} (known: {', '.join(sorted(allowed))})", where=str(path))
    for stage, cls in stages.items():
        section = data.get(stage) or {}
        if not isinstance(section, dict):
            raise PotstillError(f"section {stage!r} must be a mapping", where=str(path))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise PotstillError(f"{stage}: unknown field {unknown[0]!r}", where=str(path))
    return data


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
