"""knorm_lib: KnormPress (keep the keys with the lowest L2 norm) measured right.

The one module the study's notebooks import. Sections, in reading order:

1. loading      ``load_model`` (embedded SmolLM2 or any Hugging Face id / local path), ``random_llama``
2. data         ``load_corpus``, ``encode``, ``long_documents``, ``token_kinds``, ``passkey_prompt``
3. policies     one small score function per policy (higher score = keep); ``register_policy``
4. compression  ``n_kept_for``, ``KVCache``, ``compress_cache``, ``key_norms``, re-rotation
5. evaluation   ``prefill``, ``prefill_ppl``, ``sweep`` (one prefill, many compressions), ``span_metrics``, ``generate_greedy``
   5b streaming ``streaming_ppl`` (one-pass masked evaluator and sequential reference), ``streaming_sweep``
   5c attention ``attention_received``, ``attention_mass_lost``
   5d explorer  ``Explorer`` (what 00_explore's sliders call)
6. metrics      ``token_metrics``, ``generation_agreement``, ``wilson_interval``, ``aggregate``
7. timing       ``machine_info``, ``timed``; notebook parameters and atomic result files; the speed
                study's probes (``timed_decode``, ``time_ttft``, ``peak_memory``, ``memory_bandwidth``,
                ``cold_warm_ttft``)

How to choose ``position_mode`` (the write-up's pitfall lives here):

* ``"absolute"`` -- new tokens keep their true positions. This is correct: every cached key was
  rotated by RoPE at its own position before it was cached, so attention over the kept keys is a
  set operation and neither eviction nor storage order moves any key.
* ``"cache_relative"`` -- new tokens are numbered from the *compressed* cache length (the length
  of the compressed layers), which is what ``model(new_ids, past_key_values=cache)`` does when
  layer 0 of a transformers cache was compressed and no ``position_ids`` are passed (transformers
  reads the length of layer 0: with ``skip_layers`` containing 0 a plain call happens to number
  correctly, so this mode shows what the bug does whenever layer 0 is compressed). Queries then sit at the wrong distance from every
  key: this is the bug behind the write-up's 39.68 -> 155.91 jump.
* ``"rerotated"`` -- kept keys are re-rotated to contiguous slots ``0..n_kept-1`` (in storage
  order) and new tokens are numbered after them, like StreamingLLM's pos-shift and kvpress's
  ``KeyRerotationPress``. Only here does storage order (``order="by_norm"``) matter.

All evaluation is batch size 1 and unpadded; the attention function registered below builds its
own causal mask from each layer's key length, so layers may hold caches of different lengths
(``skip_layers``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import numbers
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "load_model", "random_llama", "load_corpus", "encode", "Document", "TokenizedDoc", "long_documents", "token_kinds",
    "POLICIES", "register_policy", "PolicyOptions", "LayerKV",
    "n_kept_for", "KVCache", "compress_cache", "key_norms", "rerotate_keys",
    "Prefill", "prefill", "continuation_logits", "EvalConfig", "EvalResult", "prefill_ppl", "sweep", "full_ppl",
    "attention_received", "future_attention", "attention_mass_lost", "Explorer", "ExplorerView", "highlight_html", "norm_strip_html",
    "StreamingConfig", "budget_schedule", "eviction_steps", "dynamic_eviction_steps", "streaming_mask", "streaming_ppl",
    "streaming_sweep", "full_logits",
    "generate_greedy", "token_metrics", "generation_agreement", "aggregate", "keep_ratio_thresholds", "machine_info", "timed",
    "weight_bytes", "rss_bytes", "peak_memory", "timed_decode", "time_ttft", "memory_bandwidth", "matmul_rate",
    "op_profile", "decode_profile", "cold_warm_ttft",
    "PasskeyPrompt", "passkey_key", "passkey_prompt", "span_metrics", "wilson_interval",
]

PROJECT_ROOT = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("KNORM_DATA_DIR", PROJECT_ROOT / "data"))
DEFAULT_MODEL_DIR = DATA_DIR / "models" / "SmolLM2-135M-Instruct"
CORPUS_DIR = DATA_DIR / "corpora"
# Where notebooks record results and figures. Only `make report` writes the committed ones
# (data/results/, figures/): it sets these variables. Any other run writes under build/.
RESULTS_DIR = Path(os.environ.get("KNORM_RESULTS_DIR", PROJECT_ROOT / "build" / "results"))
FIGURES_DIR: Path | None = Path(os.environ["KNORM_FIGURES_DIR"]) if os.environ.get("KNORM_FIGURES_DIR") else None
ATTN_IMPLEMENTATION = "knorm_study"

PositionMode = Literal["absolute", "cache_relative", "rerotated"]
Order = Literal["original", "by_norm"]
POSITION_MODES: tuple[str, ...] = ("absolute", "cache_relative", "rerotated")
ORDERS: tuple[str, ...] = ("original", "by_norm")


# ----------------------------------------------------------------------------------------------
# 1. Loading
# ----------------------------------------------------------------------------------------------

# Per-layer attention masks for evaluators that need more than causal attention (the one-pass
# streaming evaluator). ``None`` means plain causal attention.
# Called as ``mask_fn(layer_idx, query, key, scale)`` with the layer's RoPE-rotated tensors.
MaskFn = Callable[[int, torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]
_MASK_FN: contextvars.ContextVar[MaskFn | None] = contextvars.ContextVar("knorm_mask_fn", default=None)
# Receives (layer_idx, attention probabilities (B, H_q, q_len, k_len)) from every attention call.
_ATTN_RECORDER: contextvars.ContextVar[Callable[[int, torch.Tensor], None] | None] = \
    contextvars.ContextVar("knorm_attn_recorder", default=None)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA whose causal mask comes from this layer's own key length.

    The ``q_len`` new queries are the last ``q_len`` tokens of ``key``; everything before them is
    cache and fully visible. This is why layers may hold caches of different lengths.
    """
    for feature in ("sliding_window", "softcap", "s_aux"):   # features this function does not implement
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"layer {module.layer_idx}: attention with {feature}={kwargs[feature]!r} is not "
                                      "implemented by knorm_lib's attention function (load_model refuses such models)")
    q_len, k_len = query.shape[2], key.shape[2]
    mask_fn = _MASK_FN.get()
    scale = scaling or query.shape[-1] ** -0.5
    mask = mask_fn(module.layer_idx, query, key, scale) if mask_fn is not None else None
    is_causal = False
    if mask is None and q_len > 1:
        if q_len == k_len:
            is_causal = True
        else:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    recorder = _ATTN_RECORDER.get()
    if recorder is not None:  # H2O and the attention studies read the attention probabilities
        groups = query.shape[1] // key.shape[1]
        logits = query @ key.repeat_interleave(groups, dim=1).transpose(-1, -2) * scale
        if mask is not None or is_causal:
            visible = mask if mask is not None else torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            logits = logits.masked_fill(~visible, float("-inf"))
        recorder(module.layer_idx, logits.float().softmax(-1))  # (B, H_q, q_len, k_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)


def _looks_like_path(name: str) -> bool:
    # Hugging Face ids look like "org/name"; anything else with a slash, a dot or a tilde is a path,
    # and so is "dir/name" when "dir" is a local directory.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline (``HF_HUB_OFFLINE``) or the hub does not answer within ``timeout_s``:
    then a missing model fails at once instead of after the hub client's minute of retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_supported(model: Any) -> None:
    """Refuse, naming the feature, a model this library cannot evaluate exactly.

    Supported: decoder-only models with RoPE attention laid out like Llama (``model.model.layers[i]
    .self_attn``, one ``model.model.rotary_emb``): Llama (any RoPE scaling), Mistral without a
    sliding window, Qwen2/Qwen3 (window off), Phi-3, SmolLM. Refused: other layouts (GPT-2,
    encoder-decoders), sliding-window attention (Mistral-7B-v0.1, Gemma2/3: the attention function
    masks by each layer's own cache, which no longer says how far back a key sits once tokens are
    evicted), attention logit softcapping (Gemma2), per-layer-type RoPE (Gemma3)."""
    cfg = getattr(model, "config", None)
    arch = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if cfg is None or layers is None or getattr(inner, "rotary_emb", None) is None \
            or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"model: {arch} is not supported: knorm_lib evaluates decoder-only models with RoPE "
                         "attention laid out like Llama (model.model.layers[i].self_attn, model.model.rotary_emb)")
    _check_config(cfg, arch)


def _check_config(cfg: Any, arch: str) -> None:
    """The attention features ``check_supported`` refuses, read from the config (before any weights load)."""
    layer_types = getattr(cfg, "layer_types", None) or ()
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in layer_types or (window is not None and getattr(cfg, "use_sliding_window", None) is not False):
        raise ValueError(f"model: {arch} uses sliding-window attention (sliding_window={window}), which knorm_lib's "
                         "attention function does not implement; refusing rather than computing other numbers")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"model: {arch} uses attention logit softcapping (attn_logit_softcapping="
                         f"{cfg.attn_logit_softcapping}), which knorm_lib's attention function does not implement")
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"model: {arch} uses a different RoPE per layer type ({sorted(rope)}), which "
                         "knorm_lib's re-rotation and scorers do not handle")


def load_model(name: str | os.PathLike | None = None, device: str = "cpu",
               dtype: torch.dtype | str = torch.float32) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode, using this module's attention function.

    ``name=None`` loads the embedded SmolLM2-135M-Instruct that ``make data`` caches as
    safetensors under ``data/models/``. Any Hugging Face id or local directory works too; weights
    load from safetensors only and ``trust_remote_code`` stays off. ``device="auto"`` hands a model
    larger than one GPU to accelerate (``device_map="auto"``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _register_attention()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype (try 'float32' or 'bfloat16')")
        dtype = getattr(torch, dtype)
    if name is None:
        source = str(DEFAULT_MODEL_DIR)
        if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
            raise FileNotFoundError(f"load_model(name=None): the embedded model is not at {DEFAULT_MODEL_DIR}; "
                                    "run `make data` first")
    else:
        source = str(Path(name).expanduser()) if _looks_like_path(str(name)) else str(name)
        if _looks_like_path(str(name)) and not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"load_model(name={str(name)!r}): no model directory with a config.json there")
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
                                  trust_remote_code=False, use_safetensors=True)
    if device == "auto":
        kwargs["device_map"] = "auto"
    def load(local_only: bool) -> tuple[Any, Any]:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
        _check_config(cfg, (getattr(cfg, "architectures", None) or [cfg.model_type])[0])
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs), tok

    try:
        model, tokenizer = load(local_only=True)   # a local directory or the Hugging Face cache
    except OSError as err:
        if name is None or _looks_like_path(str(name)) or not _hub_reachable():
            raise FileNotFoundError(f"load_model(name={str(name)!r}): not a local model directory and not in the "
                                    f"Hugging Face cache, and the hub is not reachable ({err})") from err
        try:
            model, tokenizer = load(local_only=False)
        except OSError as err2:
            raise FileNotFoundError(f"load_model(name={str(name)!r}): cannot load it from the hub ({err2})") from err2
    check_supported(model)
    if device != "auto":
        model.to(device)
    model.eval()
    return model, tokenizer


def random_llama(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 **config: Any) -> Any:
    """A random-weight Llama built from a config (no download), with this module's attention.

    Defaults give a tiny model for tests (4 layers, 4 query heads, 2 KV heads, head_dim 16);
    pass e.g. ``num_hidden_layers=32, hidden_size=4096, ...`` for a speed study at real shapes
    (speed does not depend on the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _register_attention()
    defaults = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                    rope_theta=10_000.0, tie_word_embeddings=False)
    cfg = LlamaConfig(**{**defaults, **config})
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    return model.eval()


def _layers(model: Any) -> Sequence[torch.nn.Module]:
    return model.model.layers


def _n_layers(model: Any) -> int:
    return len(_layers(model))


# ----------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Document:
    title: str
    text: str
    n_tokens: int | None = None


CORPORA: tuple[str, ...] = ("wiki", "news")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED_CORPORA: set[Path] = set()   # checked against the manifest once per process


def verified_corpus_path(name: str) -> Path:
    """``data/corpora/<name>.jsonl`` after checking its sha256 against ``data/manifest.json`` (once
    per process): a cut or edited corpus is an error, never silently other documents."""
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r}: choose one of {CORPORA}")
    path = CORPUS_DIR / f"{name}.jsonl"
    manifest = DATA_DIR / "manifest.json"
    if not path.exists() or not manifest.exists():
        raise FileNotFoundError(f"corpus={name!r}: {path if not path.exists() else manifest} is missing; "
                                "run `make data` first")
    if path not in _VERIFIED_CORPORA:
        expected = json.loads(manifest.read_text(encoding="utf-8")).get("corpora", {}).get(name, {}).get("sha256")
        got = file_sha256(path)
        if got != expected:
            raise ValueError(f"corpus={name!r}: {path} has sha256 {got}, but {manifest} records {expected}: "
                             "the file is damaged or changed; run `make data` to rebuild it")
        _VERIFIED_CORPORA.add(path)
    return path


def load_corpus(name: Literal["wiki", "news"] = "wiki") -> list[Document]:
    """Documents of a corpus written by ``make data`` (``data/corpora/<name>.jsonl``), verified."""
    path = verified_corpus_path(name)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"corpus={name!r}: {path}:{line_no} is not valid JSON ({err})") from err
    return [Document(r["title"], r["text"], r.get("n_tokens")) for r in rows]


def encode(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a ``(1, n)`` LongTensor (no special tokens added), cut to ``max_tokens``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text: empty text has no tokens to evaluate")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, :max_tokens] if max_tokens is not None else ids


@dataclass(frozen=True)
class TokenizedDoc:
    title: str
    input_ids: torch.Tensor   # (1, n_tokens)


def long_documents(tokenizer: Any, corpus: Literal["wiki", "news"], n_tokens: int, n_docs: int) -> list[TokenizedDoc]:
    """``n_docs`` token sequences of exactly ``n_tokens`` from real text, deterministic.

    ``wiki``: the longest articles (cut to ``n_tokens``). ``news``: the articles are short (about
    250 tokens), so consecutive articles are joined with blank lines into non-overlapping streams."""
    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens={n_tokens!r}: must be an int >= 2")
    if not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs={n_docs!r}: must be an int >= 1")
    docs = load_corpus(corpus)
    out: list[TokenizedDoc] = []
    if corpus == "wiki":
        for doc in sorted(docs, key=lambda d: (-(d.n_tokens or 0), d.title))[:n_docs]:
            ids = encode(tokenizer, doc.text, n_tokens)
            if ids.shape[1] == n_tokens:
                out.append(TokenizedDoc(doc.title, ids))
    else:
        parts: list[str] = []
        first = 0
        for i, doc in enumerate(docs):
            parts.append(doc.text)
            ids = encode(tokenizer, "\n\n".join(parts))
            if ids.shape[1] >= n_tokens:
                title = doc.title if first == i else f"{docs[first].title}..{doc.title}"
                out.append(TokenizedDoc(title, ids[:, :n_tokens]))
                parts, first = [], i + 1
                if len(out) == n_docs:
                    break
    if len(out) < n_docs:
        raise ValueError(f"n_docs={n_docs}: corpus {corpus!r} has only {len(out)} documents of {n_tokens} tokens")
    return out


TOKEN_KINDS: tuple[str, ...] = ("first", "newline", "punctuation", "stop_word", "other")
STOP_WORDS = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being
it its this that these those he she they we you i his her their our your not no so than then there here which who
whom what when where why how all any each also has have had do does did will would can could may might""".split())


def token_kinds(tokenizer: Any, input_ids: torch.Tensor) -> list[str]:
    """A kind per token, for grouping norms: ``first`` (the attention sink; these sequences carry no
    BOS), ``newline``, ``punctuation``, ``stop_word`` (short English function words), ``other``."""
    kinds = []
    for i, token_id in enumerate(_check_ids(input_ids)[0].tolist()):
        text = tokenizer.decode([token_id])
        word = text.strip()
        if i == 0:
            kinds.append("first")
        elif "\n" in text:
            kinds.append("newline")
        elif word and not any(c.isalnum() for c in word):
            kinds.append("punctuation")
        elif word.lower() in STOP_WORDS:
            kinds.append("stop_word")
        else:
            kinds.append("other")
    return kinds


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey-retrieval sample: ``input_ids[:, :context_len]`` is the chat-template prefix and
    the filler holding the key line (what gets compressed); then the question, the end of the user
    turn, the assistant prefix, ``PASSKEY_ANSWER_PREFIX`` and the space before the key (when the
    tokenizer makes it a token of its own); ``input_ids[:, key_start:]`` are the key's digit tokens,
    the answer greedy decoding must reproduce."""
    input_ids: torch.Tensor   # (1, n)
    context_len: int
    key_start: int
    key: str
    depth: float
    key_position: int         # index of the key line's first token in the context

    @property
    def prompt_ids(self) -> torch.Tensor:
        """Everything before the key's tokens (what a generation run is given)."""
        return self.input_ids[:, :self.key_start]

    @property
    def key_ids(self) -> torch.Tensor:
        return self.input_ids[0, self.key_start:]


def passkey_key(seed: int, context_tokens: int, depth: float, digits: int = 5) -> str:
    """A ``digits``-digit key drawn from an RNG seeded by ``(seed, context_tokens, depth)``."""
    import random

    _positive_int("digits", digits)
    rng = random.Random(f"passkey:{seed}:{context_tokens}:{float(depth)!r}")
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def passkey_prompt(tokenizer: Any, context_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """Build a LongLoRA / landmark-style passkey sample whose context is exactly ``context_tokens``.

    The filler (``PASSKEY_FILLER`` repeated, cut to length at the token level) surrounds the line
    "The pass key is KEY. Remember it. KEY is the pass key.", inserted at the sentence boundary
    nearest ``depth`` (0.0: first, 1.0: last) of the filler. The user turn is wrapped in the
    tokenizer's chat template when it has one (plain text otherwise)."""
    if not isinstance(key, str) or not key.isdigit():
        raise ValueError(f"key={key!r}: must be a non-empty string of digits")
    if not isinstance(depth, numbers.Real) or isinstance(depth, bool) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: must be a number in [0, 1]")
    _positive_int("context_tokens", context_tokens)
    marker = "\x00FILLER\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker + PASSKEY_QUESTION}],
                                             tokenize=False, add_generation_prompt=True)
        if text.count(marker) != 1:
            raise ValueError("tokenizer: its chat template does not keep the user message verbatim")
        head, tail = text.split(marker)
    else:
        head, tail = "", PASSKEY_QUESTION + "\n"
    ids = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    head_ids = ids(head + PASSKEY_INTRO)
    key_line = ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
    unit = ids(PASSKEY_FILLER)
    n_filler = context_tokens - len(head_ids) - len(key_line)
    if n_filler < len(unit):
        raise ValueError(f"context_tokens={context_tokens}: too short; the template, instructions and key line "
                         f"take {len(head_ids) + len(key_line)} tokens, the filler needs at least {len(unit)} more")
    filler = unit.repeat(n_filler // len(unit) + 1)[:n_filler]
    period = set(ids(".").tolist())
    bounds = [0] + [i + 1 for i, t in enumerate(filler.tolist()) if t in period] + [n_filler]
    cut = min(bounds, key=lambda b: (abs(b - depth * n_filler), b))
    context = torch.cat([head_ids, filler[:cut], key_line, filler[cut:]])
    question = ids(tail + PASSKEY_ANSWER_PREFIX)
    answer = ids(" " + key)
    lead = 0  # a whitespace-only first token (" " before the digits) belongs to the answer prefix
    while lead < len(answer) - 1 and not tokenizer.decode(answer[lead:lead + 1]).strip():
        lead += 1
    input_ids = torch.cat([context, question, answer])[None]
    return PasskeyPrompt(input_ids, len(context), len(context) + len(question) + lead, key, float(depth),
                         len(head_ids) + cut)


# ----------------------------------------------------------------------------------------------
# 3. Scores and policies (higher score = keep)
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerKV:
    """What a policy may look at for one layer: keys/values ``(B, H_kv, S, D)``, their original
    positions ``(B, H_kv, S)``, and (for kvpress presses) the layer's input hidden states."""
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    layer_idx: int
    module: torch.nn.Module | None = None
    hidden_states: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_mass: torch.Tensor | None = None  # dynamic policies (h2o), streaming protocol only
    budget: int | None = None                   # tokens to keep at this step (streaming)


@dataclass(frozen=True)
class PolicyOptions:
    seed: int = 0     # ``random``
    n_sink: int = 4   # ``streaming``

    def __post_init__(self) -> None:
        for name, value, low in (("seed", self.seed, None), ("n_sink", self.n_sink, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ValueError(f"{name}={value!r}: must be an int" + (f" >= {low}" if low is not None else ""))


ScoreFn = Callable[[LayerKV, PolicyOptions], torch.Tensor]
POLICIES: dict[str, ScoreFn] = {}


def register_policy(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: ``@register_policy("mine")`` on ``def mine(kv, opts) -> scores (B, H_kv, S)``
    makes ``policy="mine"`` work everywhere (compression, evaluation, every notebook)."""
    def wrap(fn: ScoreFn) -> ScoreFn:
        POLICIES[name] = fn
        return fn
    return wrap


def _norms(keys: torch.Tensor) -> torch.Tensor:
    # float32 on purpose: bf16 norms tie heavily (kvpress does the same).
    return keys.float().norm(dim=-1)


@register_policy("knorm")
def knorm_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """KnormPress: keep the lowest key norms."""
    return -_norms(kv.keys)


@register_policy("high_norm")
def high_norm_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """Ablation: keep the highest key norms (the paper finds this worse than random)."""
    return _norms(kv.keys)


def _hash_uniform(positions: torch.Tensor, layer_idx: int, seed: int) -> torch.Tensor:
    """A uniform number in [0, 1) per (seed, layer, KV head, position): a fixed function of the
    token, so a streaming run and a prefill run draw the same score for the same token."""
    heads = torch.arange(positions.shape[1], device=positions.device).view(1, -1, 1)
    x = (positions * 0x9E3779B1 + heads * 0x85EBCA77 + layer_idx * 0xC2B2AE3D + seed * 0x27D4EB2F) & 0xFFFFFFFF
    for _ in range(2):  # integer mixing (all intermediate values stay below 2**63)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x ^ (x >> 16)).double() / 2.0**32).float()


@register_policy("random")
def random_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """Uniform random, seeded: the same (seed, layer, head, token) always draws the same score."""
    return _hash_uniform(kv.positions, kv.layer_idx, opts.seed)


@register_policy("streaming")
def streaming_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """StreamingLLM: the first ``n_sink`` tokens, then the most recent ones. Sinks rank above every
    other token and among themselves by age (the first token last to go, should the budget ever be
    smaller than ``n_sink``); 2**23 keeps the scores exact in float32."""
    pos = kv.positions.float()
    return torch.where(kv.positions < opts.n_sink, 2.0**23 + opts.n_sink - pos, pos)


@register_policy("h2o")
def h2o_score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
    """H2O: the most recent half of the budget, then the heavy hitters by attention received so
    far. Dynamic (a token's score grows with later queries): streaming protocol only."""
    if kv.attention_mass is None or kv.budget is None:
        raise ValueError("policy='h2o' is dynamic (it needs the attention each token received so far): "
                         "use it with streaming_ppl, not with prefill compression")
    n_recent = kv.budget // 2  # H2O's even split; 0 while the budget is 1 (then attention alone decides)
    newest = kv.positions.amax(dim=-1, keepdim=True)
    recent = kv.positions > newest - n_recent
    return torch.where(recent, kv.attention_mass.new_full((), float("inf")), kv.attention_mass)


STATIC_POLICIES: tuple[str, ...] = ("knorm", "high_norm", "random", "streaming")  # score fixed once the key exists
DYNAMIC_POLICIES: tuple[str, ...] = ("h2o",)

KVPRESS_POLICIES: dict[str, str] = {"snapkv": "SnapKVPress", "tova": "TOVAPress",
                                    "expected_attention": "ExpectedAttentionPress"}


def _press_score_fn(press: Any) -> ScoreFn:
    def score(kv: LayerKV, opts: PolicyOptions) -> torch.Tensor:
        if kv.hidden_states is None or kv.module is None:
            raise ValueError("policy: kvpress presses need the prefill's hidden states; "
                             "use prefill(..., capture_hidden=True) (prefill_ppl and sweep do it)")
        kwargs = {"position_embeddings": kv.position_embeddings,
                  "cache_position": torch.arange(kv.keys.shape[2], device=kv.keys.device)}
        return press.score(kv.module, kv.hidden_states, kv.keys, kv.values, None, kwargs).float()
    return score


def _make_kvpress(name: str) -> Any:
    import kvpress

    return getattr(kvpress, KVPRESS_POLICIES[name])()


def resolve_policy(policy: str | Any) -> tuple[str, ScoreFn, bool]:
    """``(name, score_fn, needs_hidden_states)`` for a policy name or a kvpress ``ScorerPress``."""
    if isinstance(policy, str):
        if policy in POLICIES:
            return policy, POLICIES[policy], False
        if policy in KVPRESS_POLICIES:
            return policy, _press_score_fn(_make_kvpress(policy)), True
        raise ValueError(f"policy={policy!r}: unknown; choose one of "
                         f"{sorted(POLICIES) + sorted(KVPRESS_POLICIES)} or pass a kvpress ScorerPress")
    if hasattr(policy, "score") and hasattr(policy, "compression_ratio"):
        return type(policy).__name__, _press_score_fn(policy), True
    raise ValueError(f"policy={policy!r}: expected a policy name or a kvpress ScorerPress instance")


# ----------------------------------------------------------------------------------------------
# 4. Compression
# ----------------------------------------------------------------------------------------------

def _check_keep_ratio(keep_ratio: float) -> float:
    if not isinstance(keep_ratio, numbers.Real) or isinstance(keep_ratio, bool) or math.isnan(keep_ratio) \
            or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio!r}: must be a number in (0, 1]")
    return float(keep_ratio)


def n_kept_for(n: int, keep_ratio: float) -> int:
    """Tokens kept out of ``n``: exactly kvpress's ``compute_n_kept(n, 1 - keep_ratio)``."""
    compression_ratio = 1 - _check_keep_ratio(keep_ratio)
    return max(1, int(n * (1 - compression_ratio)))


@dataclass
class KVCache:
    """A per-layer KV cache detached from transformers: ``keys``/``values`` ``(B, H_kv, S_l, D)``,
    the original ``positions`` ``(B, H_kv, S_l)`` of what each layer holds, and ``seq_len``, the
    number of tokens seen. Layers may hold different lengths (skipped layers are not compressed)."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    seq_len: int

    @classmethod
    def from_transformers(cls, cache: Any) -> "KVCache":
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        b, h, s, _ = keys[0].shape
        pos = torch.arange(s, device=keys[0].device).expand(b, h, s)
        return cls(keys, values, [pos] * len(keys), s)

    def to_transformers(self) -> Any:
        """A fresh ``DynamicCache`` holding these tensors (later updates never touch ``self``)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        return cache

    def lengths(self) -> list[int]:
        return [k.shape[2] for k in self.keys]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _check_layer_list(name: str, layers: Any) -> tuple[int, ...]:
    if not isinstance(layers, (list, tuple, set, frozenset, range)) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{name}={layers!r}: must be a list of layer indices, e.g. (0, 1) or ()")
    return tuple(layers)


def _check_skip_layers(skip_layers: Iterable[int], n_layers: int) -> frozenset[int]:
    skip = frozenset(_check_layer_list("skip_layers", skip_layers))
    bad = [i for i in skip if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"skip_layers={tuple(skip_layers)!r}: {bad} outside the model's layers 0..{n_layers - 1}")
    return skip


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")


def keep_indices(scores: torch.Tensor, positions: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (last dim) of the ``n_keep`` highest ``scores``: THE TIE RULE of every ranking here.

    Equal scores resolve by position: the newest token stays, the oldest goes first. Prefill
    compression, both streaming engines (whose heap and replay evict the oldest of equal scores)
    and the attention-loss study all rank through this rule, so a kept set is a function of the
    scores and the positions, never of how ``topk`` or a heap happens to order ties."""
    by_position = positions.argsort(dim=-1, descending=True, stable=True)
    by_score = scores.gather(-1, by_position).argsort(dim=-1, descending=True, stable=True)
    return by_position.gather(-1, by_score)[..., :n_keep]


def storage_order(idx: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, order: Order) -> torch.Tensor:
    """Kept indices ``idx`` rearranged for storage: by position (``"original"``), or by ascending
    key norm with equal norms by position (``"by_norm"``, what the paper's code stores)."""
    idx = idx.gather(-1, positions.gather(-1, idx).argsort(dim=-1, stable=True))
    if order == "by_norm":
        idx = idx.gather(-1, _norms(keys).gather(-1, idx).argsort(dim=-1, stable=True))
    return idx


def _gather_kept(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, gather_idx), values.gather(2, gather_idx), positions.gather(-1, idx)


@torch.inference_mode()
def compress_cache(cache: KVCache, keep_ratio: float, policy: str | Any = "knorm",
                   skip_layers: Iterable[int] = (0, 1), order: Order = "original",
                   options: PolicyOptions = PolicyOptions(), layer_inputs: dict[int, dict] | None = None,
                   scores: list[torch.Tensor] | None = None) -> KVCache:
    """Keep, per layer and KV head, the ``n_kept_for(S, keep_ratio)`` tokens with the highest
    policy score (``knorm``: the lowest key norms). ``skip_layers`` are left whole (default
    ``(0, 1)``, the paper's choice; ``()`` compresses every layer). ``order="original"`` stores the
    kept tokens in position order, ``"by_norm"`` by ascending key norm (what the write-up and the
    paper's code store). ``scores`` (one ``(B, H_kv, S)`` tensor per layer) skips re-scoring."""
    keep_ratio = _check_keep_ratio(keep_ratio)
    skip = _check_skip_layers(skip_layers, len(cache.keys))
    _check_choice("order", order, ORDERS)
    if scores is None:
        scores = policy_scores(cache, policy, options, layer_inputs, skip)
    keys, values, positions = [], [], []
    for i, (k, v, p) in enumerate(zip(cache.keys, cache.values, cache.positions)):
        if i in skip or (keep_ratio == 1.0 and order == "original"):
            keys.append(k), values.append(v), positions.append(p)
            continue
        idx = storage_order(keep_indices(scores[i], p, n_kept_for(k.shape[2], keep_ratio)), p, k, order)
        for out, kept in zip((keys, values, positions), _gather_kept(k, v, p, idx)):
            out.append(kept)
    return KVCache(keys, values, positions, cache.seq_len)


@torch.inference_mode()
def policy_scores(cache: KVCache, policy: str | Any, options: PolicyOptions = PolicyOptions(),
                  layer_inputs: dict[int, dict] | None = None,
                  skip: Iterable[int] = ()) -> list[torch.Tensor | None]:
    """One score tensor ``(B, H_kv, S)`` per layer (``None`` for skipped layers)."""
    _, score_fn, needs_hidden = resolve_policy(policy)
    if needs_hidden and not layer_inputs:
        raise ValueError("policy: kvpress presses need the prefill's hidden states; "
                         "use prefill(..., capture_hidden=True)")
    skip = set(skip)
    out: list[torch.Tensor | None] = []
    for i, (k, v, p) in enumerate(zip(cache.keys, cache.values, cache.positions)):
        if i in skip:
            out.append(None)
            continue
        extra = (layer_inputs or {}).get(i, {})
        out.append(score_fn(LayerKV(k, v, p, i, **extra), options))
    return out


def key_norms(model_or_cache: Any, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Key L2 norms, float32, shape ``(layers, H_kv, positions)``, from a ``KVCache`` or by
    prefilling ``input_ids``. RoPE rotates coordinate pairs, so these equal the pre-RoPE norms."""
    cache = model_or_cache if isinstance(model_or_cache, KVCache) else prefill(model_or_cache, input_ids).cache
    return _stack_padded([_norms(k)[0] for k in cache.keys])


def value_norms(cache: KVCache) -> torch.Tensor:
    """Value L2 norms, float32, ``(layers, H_kv, positions)`` (for contrast with key norms)."""
    return _stack_padded([_norms(v)[0] for v in cache.values])


def _stack_padded(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(H_kv, S_l)`` tensors; layers shorter than the longest (compressed) end in NaN."""
    longest = max(t.shape[-1] for t in per_layer)
    return torch.stack([F.pad(t, (0, longest - t.shape[-1]), value=float("nan")) for t in per_layer])


def _rotate(keys: torch.Tensor, delta: torch.Tensor, model: Any) -> torch.Tensor:
    """Apply RoPE by ``delta`` positions (per token, may be negative) to already-rotated keys."""
    rotary = model.model.rotary_emb
    b, h, s, d = keys.shape
    rotated_dims = 2 * rotary.inv_freq.numel() if hasattr(rotary, "inv_freq") else d
    if rotated_dims != d:
        raise ValueError(f"position_mode='rerotated': this model rotates {rotated_dims} of {d} dimensions per head "
                         "(partial RoPE); re-rotation supports full RoPE only")
    cos, sin = rotary(keys, delta.reshape(1, -1).to(keys.device))
    scale = getattr(rotary, "attention_scaling", 1.0)
    cos = (cos / scale).reshape(b, h, s, d).to(keys.dtype)
    sin = (sin / scale).reshape(b, h, s, d).to(keys.dtype)
    half = d // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated_half * sin


def rerotate_keys(cache: KVCache, model: Any) -> tuple[KVCache, int]:
    """Move each kept key to a contiguous slot (storage order), like StreamingLLM's pos-shift.

    The shortest (compressed) layers map slot ``s`` to position ``s``; longer (skipped) layers are
    shifted as a whole so their relative positions, and so their attention, stay exact. Returns the
    new cache and the position the next token gets."""
    next_position = min(cache.lengths())
    keys, positions = [], []
    for k, p in zip(cache.keys, cache.positions):
        s = k.shape[2]
        slots = torch.arange(s, device=k.device).expand_as(p) + (next_position - s)
        keys.append(_rotate(k, slots - p, model))
        positions.append(slots)
    return KVCache(keys, list(cache.values), positions, cache.seq_len), next_position


# ----------------------------------------------------------------------------------------------
# 5. Evaluation
# ----------------------------------------------------------------------------------------------

@dataclass
class Prefill:
    cache: KVCache
    last_logits: torch.Tensor                       # (1, vocab): predicts the token after the context
    layer_inputs: dict[int, dict] | None = None     # per layer: module, hidden_states, position_embeddings


@contextlib.contextmanager
def _capture_layer_inputs(model: Any, store: dict[int, dict]) -> Iterator[None]:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        store[module.layer_idx] = {"module": module, "hidden_states": hidden,
                                   "position_embeddings": kwargs.get("position_embeddings")}

    for layer in _layers(model):  # some presses (ExpectedAttention) read RoPE from the layer, as kvpress arranges
        if not hasattr(layer.self_attn, "rotary_emb"):
            layer.self_attn.rotary_emb = model.model.rotary_emb
    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in _layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids: expected an integer tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected shape (1, n), got {tuple(input_ids.shape)} (batch size 1 only)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: empty input has no tokens to evaluate")
    return input_ids


@torch.inference_mode()
def prefill(model: Any, input_ids: torch.Tensor, capture_hidden: bool = False) -> Prefill:
    """One forward over ``input_ids``; returns the full cache (with original positions), the last
    logits, and, with ``capture_hidden``, each attention layer's inputs (for kvpress presses)."""
    from transformers import DynamicCache

    input_ids = _check_ids(input_ids).to(model.device)
    _check_vocab(model, input_ids)
    store: dict[int, dict] = {}
    ctx = _capture_layer_inputs(model, store) if capture_hidden else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    return Prefill(KVCache.from_transformers(out.past_key_values), out.logits[:, -1].float(),
                   store if capture_hidden else None)


def _numbered(cache: KVCache, model: Any, position_mode: PositionMode) -> tuple[KVCache, int]:
    """The cache to attend to and the position the next new token gets under ``position_mode``."""
    _check_choice("position_mode", position_mode, POSITION_MODES)
    if position_mode == "rerotated":
        return rerotate_keys(cache, model)
    return cache, cache.seq_len if position_mode == "absolute" else min(cache.lengths())


@torch.inference_mode()
def continuation_logits(model: Any, cache: KVCache, new_ids: torch.Tensor,
                        position_mode: PositionMode = "absolute") -> torch.Tensor:
    """Logits ``(T, vocab)`` for ``new_ids`` fed teacher-forced in one forward over ``cache``.

    ``position_mode`` numbers the new tokens: ``absolute`` from ``cache.seq_len`` (true positions),
    ``cache_relative`` from the compressed length (the bug), ``rerotated`` after the re-rotated
    slots."""
    cache, start = _numbered(cache, model, position_mode)
    t = new_ids.shape[-1]
    position_ids = torch.arange(start, start + t, device=model.device)[None]
    out = model(input_ids=new_ids.to(model.device).view(1, -1), past_key_values=cache.to_transformers(),
                position_ids=position_ids, use_cache=True)
    return out.logits[0]


@dataclass(frozen=True)
class EvalConfig:
    keep_ratio: float = 1.0
    policy: str = "knorm"
    skip_layers: tuple[int, ...] = (0, 1)
    order: Order = "original"
    position_mode: PositionMode = "absolute"
    seed: int = 0
    n_sink: int = 4

    def validate(self, n_layers: int) -> None:
        _check_keep_ratio(self.keep_ratio)
        if self.policy not in POLICIES and self.policy not in KVPRESS_POLICIES:
            raise ValueError(f"policy={self.policy!r}: unknown; choose one of "
                             f"{sorted(POLICIES) + sorted(KVPRESS_POLICIES)}")
        _check_skip_layers(self.skip_layers, n_layers)
        _check_choice("order", self.order, ORDERS)
        _check_choice("position_mode", self.position_mode, POSITION_MODES)
        PolicyOptions(self.seed, self.n_sink)


@dataclass
class EvalResult:
    """Per-token metrics of one configuration. ``nll``, ``kl`` and friends hold one value per
    scored token: tokens ``context_len+1 .. n-1``, each predicted by a query that attends to the
    compressed cache."""
    config: EvalConfig
    nll: torch.Tensor
    correct: torch.Tensor
    kl: torch.Tensor
    top1_agree_mask: torch.Tensor
    n_kept: int
    context_len: int
    cache_bytes: int
    meta: dict = field(default_factory=dict)
    evictions: dict | None = None   # streaming: eviction step per (layer, KV head, token)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.mean().item())

    @property
    def next_token_acc(self) -> float:
        return self.correct.float().mean().item()

    @property
    def kl_mean(self) -> float:
        return self.kl.mean().item()

    @property
    def top1_agree(self) -> float:
        return self.top1_agree_mask.float().mean().item()

    def summary(self) -> dict[str, Any]:
        """Plain numbers (for tables and JSON results)."""
        cfg = asdict(self.config)
        cfg["skip_layers"] = list(cfg["skip_layers"])
        return {**cfg, "ppl": self.ppl, "mean_nll": self.nll.mean().item(), "next_token_acc": self.next_token_acc,
                "kl": self.kl_mean, "top1_agree": self.top1_agree, "n_kept": self.n_kept,
                "context_len": self.context_len, "n_scored": int(self.nll.numel()), "cache_bytes": self.cache_bytes,
                **self.meta}


def _n_kept_reported(context_len: int, keep_ratio: float, skip_layers: Sequence[int], model: Any) -> int:
    """Tokens per head a compressed layer keeps; the whole context when every layer is skipped."""
    if len(set(skip_layers)) >= _n_layers(model):
        return context_len
    return n_kept_for(context_len, keep_ratio)


def _check_vocab(model: Any, input_ids: torch.Tensor) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if (vocab is not None and int(input_ids.max()) >= vocab) or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: token ids must lie in 0..{vocab} - 1 (the model's vocabulary); "
                         f"got {int(input_ids.min())}..{int(input_ids.max())}")


def _check_context_len(context_len: int, n_tokens: int) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool) or not 1 <= context_len < n_tokens - 1:
        raise ValueError(f"context_len={context_len!r}: must be an int with 1 <= context_len < number of "
                         f"tokens - 1 = {n_tokens - 1} (at least two tokens must follow the context)")


def sweep(model: Any, input_ids: torch.Tensor, context_len: int, configs: Sequence[EvalConfig],
          progress: bool = False, reference_logits: torch.Tensor | None = None) -> list[EvalResult]:
    """Evaluate many configurations on one input with ONE prefill of the context.

    Compression after prefill only reads the prefill's cache, so compressing a fresh copy per
    configuration is exact; scores are computed once per policy and reused across keep_ratios.
    ``reference_logits`` (the uncompressed continuation's logits, e.g. from an earlier sweep of the
    same input) skips that forward: re-prefilling per configuration then costs exactly one prefill
    and one continuation, which is how 04_quality_tradeoffs times the two paths."""
    input_ids = _check_ids(input_ids)
    _check_context_len(context_len, input_ids.shape[1])
    if isinstance(configs, EvalConfig) or not all(isinstance(c, EvalConfig) for c in configs):
        raise ValueError(f"configs={configs!r}: must be a list of EvalConfig (e.g. [EvalConfig(keep_ratio=0.5)])")
    _check_vocab(model, input_ids)
    for cfg in configs:
        cfg.validate(_n_layers(model))
    needs_hidden = any(cfg.policy in KVPRESS_POLICIES for cfg in configs)
    pre = prefill(model, input_ids[:, :context_len], capture_hidden=needs_hidden)
    new_ids, targets = input_ids[:, context_len:-1], input_ids[0, context_len + 1:].to(model.device)
    ref_logits = reference_logits if reference_logits is not None else continuation_logits(model, pre.cache, new_ids)
    score_cache: dict[tuple, list] = {}
    results = []
    iterator: Iterable[EvalConfig] = configs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(configs, desc="configurations", mininterval=10)  # plain tqdm: papermill-safe
    for cfg in iterator:
        key = (cfg.policy, cfg.seed, cfg.n_sink)
        if key not in score_cache:
            score_cache[key] = policy_scores(pre.cache, cfg.policy, PolicyOptions(cfg.seed, cfg.n_sink),
                                             pre.layer_inputs)
        cache = compress_cache(pre.cache, cfg.keep_ratio, cfg.policy, cfg.skip_layers, cfg.order,
                               scores=score_cache[key])
        logits = ref_logits if _is_identity(cfg) else continuation_logits(model, cache, new_ids, cfg.position_mode)
        m = token_metrics(logits, targets, ref_logits)
        n_kept = _n_kept_reported(context_len, cfg.keep_ratio, cfg.skip_layers, model)
        results.append(EvalResult(cfg, m["nll"], m["correct"], m["kl"], m["top1_agree"], n_kept, context_len,
                                  cache.nbytes()))
    return results


def _is_identity(cfg: EvalConfig) -> bool:
    return cfg.keep_ratio == 1.0 and cfg.order == "original" and cfg.position_mode == "absolute"


def span_metrics(result: EvalResult, start: int, end: int | None = None) -> dict[str, Any]:
    """Metrics of the input tokens ``start .. end-1`` (``end=None``: to the last) from a sweep result.

    Scored token ``j`` of ``result`` is input token ``context_len + 1 + j``. ``correct`` is True iff
    the argmax is right at every position of the span, i.e. greedy decoding from the token before
    ``start`` reproduces the span exactly (a passkey answer); ``nll`` is the span's summed NLL."""
    first, n = result.context_len + 1, result.nll.numel()
    end = first + n if end is None else end
    if not isinstance(start, int) or not first <= start < first + n:
        raise ValueError(f"start={start!r}: must be a scored input position, {first} .. {first + n - 1}")
    if not isinstance(end, int) or not start < end <= first + n:
        raise ValueError(f"end={end!r}: must satisfy start < end <= {first + n}")
    sl = slice(start - first, end - first)
    correct = result.correct[sl]
    return {"correct": bool(correct.all()), "token_acc": correct.float().mean().item(),
            "nll": result.nll[sl].sum().item(), "n_tokens": end - start}


def prefill_ppl(model: Any, input_ids: torch.Tensor, context_len: int, keep_ratio: float,
                policy: str = "knorm", skip_layers: Sequence[int] = (0, 1), order: Order = "original",
                position_mode: PositionMode = "absolute", seed: int = 0, n_sink: int = 4) -> EvalResult:
    """kvpress's protocol (the write-up's "Method 2"): prefill ``context_len`` tokens, compress
    the cache once, then score the rest teacher-forced in one forward pass. Metrics are against
    the true next tokens and against the same forward on the uncompressed cache."""
    cfg = EvalConfig(keep_ratio, policy, _check_layer_list("skip_layers", skip_layers), order, position_mode, seed, n_sink)
    return sweep(model, input_ids, context_len, [cfg])[0]


@torch.inference_mode()
def full_ppl(model: Any, input_ids: torch.Tensor) -> float:
    """The uncompressed model's perplexity on ``input_ids`` (tokens 1..n-1), one forward pass.
    A baseline: it cannot depend on any compression setting."""
    input_ids = _check_ids(input_ids).to(model.device)
    _check_vocab(model, input_ids)
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids: need at least two tokens")
    logits = model(input_ids=input_ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits.float(), input_ids[0, 1:]).item())


@torch.inference_mode()
def generate_greedy(model: Any, input_ids: torch.Tensor, max_new_tokens: int, keep_ratio: float = 1.0,
                    policy: str = "knorm", skip_layers: Sequence[int] = (0, 1), order: Order = "original",
                    position_mode: PositionMode = "absolute", options: PolicyOptions = PolicyOptions(),
                    pre: Prefill | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` after compressing its prefill cache once.

    New tokens get true positions under ``absolute``. Pass ``pre`` to reuse one prefill."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    EvalConfig(keep_ratio, policy, _check_layer_list("skip_layers", skip_layers), order, position_mode).validate(_n_layers(model))
    pre = pre or prefill(model, input_ids, capture_hidden=policy in KVPRESS_POLICIES)
    cache = compress_cache(pre.cache, keep_ratio, policy, skip_layers, order, options, pre.layer_inputs)
    cache, position = _numbered(cache, model, position_mode)
    token = pre.last_logits.argmax(-1).view(1, 1)
    out_tokens = [token]
    dyn = cache.to_transformers()
    for _ in range(max_new_tokens - 1):
        token = _greedy_step(model, dyn, token, position)
        position += 1
        out_tokens.append(token)
    return torch.cat(out_tokens, dim=1)[0].cpu()


def _greedy_step(model: Any, dyn: Any, token: torch.Tensor, position: int) -> torch.Tensor:
    """One decode step: feed ``token`` (1, 1) at ``position`` into the transformers cache ``dyn``
    (extended in place); return the greedy next token (1, 1)."""
    out = model(input_ids=token, past_key_values=dyn, use_cache=True,
                position_ids=torch.tensor([[position]], device=model.device))
    return out.logits[:, -1].argmax(-1).view(1, 1)


# ----------------------------------------------------------------------------------------------
# 5b. Streaming evaluation (the paper's LM protocol, the write-up's "Method 1")
# ----------------------------------------------------------------------------------------------

Engine = Literal["sequential", "one_pass"]


@dataclass(frozen=True)
class StreamingConfig:
    policy: str = "knorm"
    keep_ratio: float | None = None
    max_cache: int | None = None
    skip_layers: tuple[int, ...] = (0, 1)
    order: Order = "original"
    position_mode: PositionMode = "absolute"
    engine: Engine = "one_pass"
    seed: int = 0
    n_sink: int = 4


def budget_schedule(n: int, keep_ratio: float | None = None, max_cache: int | None = None) -> torch.Tensor:
    """``b[t]``: tokens each compressed layer retains after step ``t`` (``t = 0..n-1``).

    ``max_cache=B``: ``min(t + 1, B)``; ``keep_ratio=r``: ``n_kept_for(t + 1, r)``."""
    if (keep_ratio is None) == (max_cache is None):
        raise ValueError(f"keep_ratio={keep_ratio!r}, max_cache={max_cache!r}: give exactly one budget")
    steps = torch.arange(1, n + 1)
    if max_cache is not None:
        _positive_int("max_cache", max_cache)
        return steps.clamp(max=max_cache)
    keep_ratio = _check_keep_ratio(keep_ratio)
    return (steps.double() * (1 - (1 - keep_ratio))).long().clamp(min=1) if keep_ratio < 1 else steps


def eviction_steps(scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """For scores ``(H, n)`` fixed once each token exists: the step at which each token is evicted
    (``n`` if never), simulating "after adding token t, evict the lowest scores until ``budget[t]``
    remain" with one heap per head, O(n log n)."""
    import heapq

    n_heads, n = scores.shape
    rows = scores.detach().double().cpu().tolist()
    caps = budget.tolist()
    out = [[n] * n for _ in range(n_heads)]
    for h in range(n_heads):
        heap: list[tuple[float, int]] = []
        row, evict = rows[h], out[h]
        for t in range(n):
            heapq.heappush(heap, (row[t], t))
            while len(heap) > caps[t]:
                evict[heapq.heappop(heap)[1]] = t
    return torch.tensor(out, dtype=torch.long)


@torch.inference_mode()
def dynamic_eviction_steps(query: torch.Tensor, key: torch.Tensor, scale: float, budget: torch.Tensor,
                           score_fn: ScoreFn, opts: PolicyOptions, layer_idx: int,
                           block: int = 256) -> torch.Tensor:
    """Eviction steps ``(H_kv, n)`` for a policy that scores by attention received (H2O), from one
    layer's queries ``(1, H_q, n, D)`` and keys ``(1, H_kv, n, D)``.

    Exact, not an approximation: query ``t`` of this layer depends only on earlier layers, whose
    retained sets are already fixed when this layer runs, so replaying the sequential engine's
    steps here ("attend to the retained set plus yourself, add the attention to each token's mass,
    then evict the lowest scores until ``budget[t]`` remain") takes the same decisions; ties go to
    the oldest token (``keep_indices``'s tie rule). Costs a few small tensor ops per token."""
    _, n_q_heads, n, _ = query.shape
    n_kv_heads = key.shape[1]
    groups = n_q_heads // n_kv_heads
    q, k = query[0].float(), key[0].float().repeat_interleave(groups, dim=0)
    alive = torch.zeros(n_kv_heads, n, dtype=torch.bool, device=key.device)
    mass = torch.zeros(n_kv_heads, n, device=key.device)
    evict = torch.full((n_kv_heads, n), n, dtype=torch.long)
    positions = torch.arange(n, device=key.device).expand(1, n_kv_heads, n)
    heads = torch.arange(n_kv_heads)
    caps, n_alive = budget.tolist(), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs would cost more than the work
    try:
        for start in range(0, n, block):
            stop = min(start + block, n)
            logits = (q[:, start:stop] @ k[:, :stop].transpose(-1, -2)) * scale   # (H_q, rows, stop)
            for t in range(start, stop):
                alive[:, t] = True
                n_alive += 1
                visible = alive[:, :t + 1].repeat_interleave(groups, 0)
                probs = logits[:, t - start, :t + 1].masked_fill(~visible, float("-inf")).softmax(-1)
                mass[:, :t + 1] += probs.view(n_kv_heads, groups, t + 1).sum(1)
                while n_alive > caps[t]:
                    kv = LayerKV(key[:, :, :t + 1], key[:, :, :t + 1], positions[..., :t + 1], layer_idx,
                                 attention_mass=mass[None, :, :t + 1], budget=caps[t])
                    scores = score_fn(kv, opts)[0].masked_fill(~alive[:, :t + 1], float("inf"))
                    gone = scores.argmin(-1)   # first minimum: the oldest of equal scores goes
                    alive[heads, gone] = False
                    evict[heads, gone.cpu()] = t
                    n_alive -= 1
    finally:
        torch.set_num_threads(threads)
    return evict


def streaming_mask(evict: torch.Tensor, groups: int) -> torch.Tensor:
    """Boolean mask ``(1, H_kv * groups, n, n)``: key ``j`` is visible to query ``t`` iff
    ``j <= t <= evict[j]`` (query t sees the set retained after step t-1, plus itself)."""
    n_heads, n = evict.shape
    t = torch.arange(n, device=evict.device).view(1, n, 1)
    j = torch.arange(n, device=evict.device).view(1, 1, n)
    mask = (j <= t) & (t <= evict.view(n_heads, 1, n))
    return mask.repeat_interleave(groups, dim=0)[None]


def _per_kv_head(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum ``(B, H_q, ...)`` over the query heads that share each KV head: ``(B, H_kv, ...)``."""
    return x.view(x.shape[0], n_kv_heads, x.shape[1] // n_kv_heads, *x.shape[2:]).sum(2)


def _query_positions(budget: torch.Tensor, position_mode: str, any_compressed: bool) -> torch.Tensor:
    n = budget.numel()
    if position_mode == "absolute" or not any_compressed:
        return torch.arange(n)
    # cache_relative: token t is numbered by the compressed cache's length before it, b[t-1]
    return torch.cat([torch.zeros(1, dtype=torch.long), budget[:-1]])


@torch.inference_mode()
def _stream_one_pass(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                     evict_override: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    _, score_fn, _ = resolve_policy(cfg.policy)
    opts = PolicyOptions(cfg.seed, cfg.n_sink)
    n = ids.shape[1]
    skip = set(cfg.skip_layers)
    evictions: dict[int, torch.Tensor] = {}

    def mask_fn(layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor | None:
        if layer_idx in skip:
            return None
        if evict_override is not None:
            evict = evict_override[layer_idx]
        elif cfg.policy in DYNAMIC_POLICIES:
            evict = dynamic_eviction_steps(query, key, scale, budget, score_fn, opts, layer_idx)
        else:
            positions = torch.arange(n, device=key.device).expand(1, key.shape[1], n)
            scores = score_fn(LayerKV(key, key, positions, layer_idx), opts)[0]
            evict = eviction_steps(scores, budget)
        evictions[layer_idx] = evict
        return streaming_mask(evict.to(key.device), model.config.num_attention_heads // key.shape[1])

    any_compressed = len(skip) < _n_layers(model)
    position_ids = _query_positions(budget, cfg.position_mode, any_compressed)[None].to(model.device)
    token = _MASK_FN.set(mask_fn)
    try:
        logits = model(input_ids=ids.to(model.device), position_ids=position_ids, use_cache=False).logits[0]
    finally:
        _MASK_FN.reset(token)
    return logits, evictions


@torch.inference_mode()
def _stream_sequential(model: Any, ids: torch.Tensor, cfg: StreamingConfig, budget: torch.Tensor,
                       progress: bool = False) -> tuple[torch.Tensor, dict]:
    """One token per forward; after each step every non-skipped layer is cut back to ``budget[t]``
    per KV head. Under ``rerotated`` the kept keys are re-rotated (from their as-cached rotation, so
    no rounding accumulates) to contiguous slots after every step, like StreamingLLM's pos-shift."""
    from transformers import DynamicCache

    _, score_fn, _ = resolve_policy(cfg.policy)
    opts = PolicyOptions(cfg.seed, cfg.n_sink)
    n, n_layers = ids.shape[1], _n_layers(model)
    skip = set(cfg.skip_layers)
    any_compressed = len(skip) < n_layers
    cache = DynamicCache()
    pos: list[torch.Tensor | None] = [None] * n_layers       # original token index per cached entry
    base_keys: list[torch.Tensor | None] = [None] * n_layers  # keys as cached (rerotated mode)
    base_rot: list[torch.Tensor | None] = [None] * n_layers   # the position each was rotated at
    mass: list[torch.Tensor | None] = [None] * n_layers       # attention received so far (h2o)
    evictions: dict[int, torch.Tensor] = {}
    rerotate = cfg.position_mode == "rerotated"

    def record(layer_idx: int, probs: torch.Tensor) -> None:
        received = _per_kv_head(probs.sum(2), model.config.num_key_value_heads)  # summed over the group
        prev = mass[layer_idx]
        mass[layer_idx] = received if prev is None else torch.cat([prev, prev.new_zeros(*prev.shape[:2], 1)], -1) + received

    recorder_token = _ATTN_RECORDER.set(record if cfg.policy in DYNAMIC_POLICIES else None)
    logits, next_position = [], 0
    steps: Iterable[int] = range(n)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="streaming (sequential)", mininterval=10)
    try:
        for t in steps:
            position = t if cfg.position_mode == "absolute" or not any_compressed else next_position
            out = model(input_ids=ids[:, t:t + 1].to(model.device), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[position]], device=model.device))
            logits.append(out.logits[0, -1])
            for i, layer in enumerate(cache.layers):
                b, h = layer.keys.shape[:2]
                new = torch.full((b, h, 1), t, device=layer.keys.device)
                pos[i] = new if pos[i] is None else torch.cat([pos[i], new], -1)
                if rerotate:
                    new_key, new_rot = layer.keys[:, :, -1:], torch.full_like(new, position)
                    base_keys[i] = new_key if base_keys[i] is None else torch.cat([base_keys[i], new_key], 2)
                    base_rot[i] = new_rot if base_rot[i] is None else torch.cat([base_rot[i], new_rot], -1)
                n_keep = int(budget[t])
                if i in skip or layer.keys.shape[2] <= n_keep:
                    continue
                kv = LayerKV(layer.keys, layer.values, pos[i], i, attention_mass=mass[i], budget=n_keep)
                idx = keep_indices(score_fn(kv, opts), pos[i], n_keep)
                kept = torch.zeros(pos[i].shape, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
                ev = evictions.setdefault(i, torch.full((h, n), n, dtype=torch.long))
                gone = pos[i][~kept].view(b, h, -1)[0].cpu()
                ev.scatter_(1, gone, t)
                idx = storage_order(idx, pos[i], layer.keys, cfg.order)
                layer.keys, layer.values, pos[i] = _gather_kept(layer.keys, layer.values, pos[i], idx)
                if mass[i] is not None:
                    mass[i] = mass[i].gather(-1, idx)
                if rerotate:
                    base_keys[i], _, base_rot[i] = _gather_kept(base_keys[i], base_keys[i], base_rot[i], idx)
            lengths = [layer.keys.shape[2] for layer in cache.layers]
            next_position = min(lengths)
            if rerotate:
                for i, layer in enumerate(cache.layers):
                    s = lengths[i]
                    slots = torch.arange(s, device=layer.keys.device).expand_as(base_rot[i]) + (next_position - s)
                    layer.keys = _rotate(base_keys[i], slots - base_rot[i], model)
    finally:
        _ATTN_RECORDER.reset(recorder_token)
    return torch.stack(logits), evictions


def streaming_ppl(model: Any, input_ids: torch.Tensor, policy: str = "knorm", keep_ratio: float | None = None,
                  max_cache: int | None = None, skip_layers: Sequence[int] = (0, 1), engine: Engine | None = None,
                  order: Order = "original", position_mode: PositionMode = "absolute", seed: int = 0,
                  n_sink: int = 4, progress: bool = False, reference_logits: torch.Tensor | None = None,
                  evict_override: dict[int, torch.Tensor] | None = None) -> EvalResult:
    """Streaming protocol: every token is scored while the cache is compressed as it grows.

    Semantics (both engines): token ``t`` is fed at its position; its query attends to the set
    retained after step ``t-1`` plus itself; then each non-skipped layer keeps, per KV head, the
    ``budget[t]`` best-scored tokens (``max_cache=B``: ``min(t+1, B)``; ``keep_ratio=r``:
    ``n_kept_for(t+1, r)``, i.e. floor, where the paper's code uses ceil). Any token may go,
    including the one just added (as in the paper's code).

    ``engine="one_pass"`` (default where it applies): the whole text is scored in ONE forward with a
    per-layer mask. For policies whose score is fixed once the key exists (knorm, high_norm, random,
    streaming) the eviction steps follow from the scores alone (a heap per KV head); for h2o they
    are replayed inside each layer from its queries and keys (``dynamic_eviction_steps``), which is
    exact because a layer's queries depend only on earlier layers. ``"sequential"``: one forward per
    token (the reference; needed for ``position_mode="rerotated"``). ``.nll`` covers tokens
    ``1..n-1``; KL and top-1 agreement compare with the uncompressed model on the same text
    (pass ``reference_logits=full_logits(model, ids)`` to share that forward across calls;
    ``streaming_sweep`` does).
    ``.evictions`` holds each compressed layer's eviction steps ``(H_kv, n)``."""
    ids = _check_ids(input_ids)
    _check_vocab(model, ids)
    n = ids.shape[1]
    if n < 2:
        raise ValueError("input_ids: need at least two tokens")
    PolicyOptions(seed, n_sink)
    resolve_policy(policy)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: streaming supports {sorted(POLICIES)}")
    skip = tuple(sorted(_check_skip_layers(skip_layers, _n_layers(model))))
    _check_choice("order", order, ORDERS)
    _check_choice("position_mode", position_mode, POSITION_MODES)
    budget = budget_schedule(n, keep_ratio, max_cache)
    if engine is None:
        engine = "one_pass" if position_mode != "rerotated" else "sequential"
    _check_choice("engine", engine, ("sequential", "one_pass"))
    if engine == "one_pass" and position_mode == "rerotated":
        raise ValueError("engine='one_pass': position_mode='rerotated' moves keys every step; use engine='sequential'")
    cfg = StreamingConfig(policy, keep_ratio, max_cache, skip, order, position_mode, engine, seed, n_sink)
    nothing_evicted = bool((budget == torch.arange(1, n + 1)).all())
    if nothing_evicted and reference_logits is not None and evict_override is None:
        logits, evictions = reference_logits, {}   # the uncompressed model's forward, already computed
    elif engine == "one_pass":
        logits, evictions = _stream_one_pass(model, ids, cfg, budget, evict_override)
    else:
        logits, evictions = _stream_sequential(model, ids, cfg, budget, progress)
    ref_logits = reference_logits if reference_logits is not None else full_logits(model, ids)
    m = token_metrics(logits[:-1], ids[0, 1:].to(model.device), ref_logits[:-1])
    kv_bytes_per_token = 2 * model.config.num_key_value_heads * _head_dim(model) * next(model.parameters()).element_size()
    lengths = [n if i in skip else int(budget[-1]) for i in range(_n_layers(model))]
    n_kept = n if len(skip) == _n_layers(model) else int(budget[-1])
    return EvalResult(cfg, m["nll"], m["correct"], m["kl"], m["top1_agree"], n_kept, 0,
                      sum(lengths) * kv_bytes_per_token, meta={"protocol": "streaming", "n_tokens": n},
                      evictions=evictions)


@torch.inference_mode()
def full_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, vocab)`` of the uncompressed model (the reference for KL and agreement)."""
    return model(input_ids=_check_ids(input_ids).to(model.device), use_cache=False).logits[0]


def streaming_sweep(model: Any, input_ids: torch.Tensor, configs: Sequence[dict[str, Any]],
                    progress: bool = False) -> list[EvalResult]:
    """``streaming_ppl`` for each configuration (keyword dicts), sharing one reference forward."""
    reference = full_logits(model, input_ids)
    iterator: Iterable[dict[str, Any]] = configs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(configs, desc="streaming configurations", mininterval=10)
    return [streaming_ppl(model, input_ids, reference_logits=reference, **cfg) for cfg in iterator]


def _head_dim(model: Any) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ----------------------------------------------------------------------------------------------
# 5c. Attention analysis (why KnormPress works: low key norm <-> high attention)
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _recording(fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    token = _ATTN_RECORDER.set(fn)
    try:
        yield
    finally:
        _ATTN_RECORDER.reset(token)


@torch.inference_mode()
def attention_received(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives, float32, ``(layers, H_kv, positions)``.

    Causal normalisation: key ``j`` is visible to the ``n - j`` queries ``j..n-1`` only, so a plain
    sum favours early keys merely because more queries see them; the sum is divided by ``n - j``
    (the mean over the queries that can see the key). Query heads sharing a KV head are averaged."""
    ids = _check_ids(input_ids).to(model.device)
    n, n_kv = ids.shape[1], model.config.num_key_value_heads
    groups = model.config.num_attention_heads // n_kv
    per_layer: dict[int, torch.Tensor] = {}

    def record(layer_idx: int, probs: torch.Tensor) -> None:
        per_layer[layer_idx] = _per_kv_head(probs.sum(2), n_kv)[0].float() / groups

    with _recording(record):
        model(input_ids=ids, use_cache=False)
    seen_by = torch.arange(n, 0, -1, device=ids.device, dtype=torch.float32)
    return torch.stack([per_layer[i] for i in sorted(per_layer)]) / seen_by


@torch.inference_mode()
def future_attention(model: Any, input_ids: torch.Tensor, context_len: int) -> tuple[torch.Tensor, KVCache]:
    """Mean attention that the continuation's queries (positions ``context_len..n-1``) pay to each
    context key, ``(layers, H_kv, context_len)`` float32 (query heads of a group averaged), and the
    context's cache (the keys a policy would score after prefilling the context)."""
    ids = _check_ids(input_ids).to(model.device)
    _check_context_len(context_len, ids.shape[1])
    n_kv = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // n_kv
    per_layer: dict[int, torch.Tensor] = {}

    def record(layer_idx: int, probs: torch.Tensor) -> None:
        future = probs[:, :, context_len:, :context_len].mean(2)
        per_layer[layer_idx] = _per_kv_head(future, n_kv)[0].float() / groups

    with _recording(record):
        model(input_ids=ids, use_cache=False)
    return torch.stack([per_layer[i] for i in sorted(per_layer)]), prefill(model, ids[:, :context_len]).cache


def attention_mass_lost(model: Any, input_ids: torch.Tensor, context_len: int, keep_ratios: Sequence[float],
                        policies: Sequence[str] = ("knorm", "random", "high_norm"),
                        options: PolicyOptions = PolicyOptions()) -> list[dict[str, Any]]:
    """Fraction of the continuation queries' attention that falls on context keys a policy evicts,
    per layer, KV head, policy and keep_ratio. ``"oracle"`` evicts the least-attended keys (by the
    same future attention): the smallest loss any policy evicting that many keys can reach."""
    future, cache = future_attention(model, input_ids, context_len)
    rows = []
    for policy in [*policies, "oracle"]:
        scores = ([f[None] for f in future] if policy == "oracle" else policy_scores(cache, policy, options))
        for keep_ratio in keep_ratios:
            n_kept = n_kept_for(context_len, keep_ratio)
            for layer, (layer_scores, attn) in enumerate(zip(scores, future)):
                positions = torch.arange(attn.shape[-1]).expand_as(attn)
                kept = torch.zeros_like(attn, dtype=torch.bool).scatter_(
                    -1, keep_indices(layer_scores[0], positions, n_kept), True)
                lost = (attn * ~kept).sum(-1)
                for head in range(attn.shape[0]):
                    rows.append({"policy": policy, "keep_ratio": keep_ratio, "layer": layer, "kv_head": head,
                                 "mass_lost": lost[head].item(), "mass_on_context": attn[head].sum().item()})
    return rows


# ----------------------------------------------------------------------------------------------
# 5d. Interactive explorer (00_explore): prefill once per text, re-compress per slider move
# ----------------------------------------------------------------------------------------------

@dataclass
class ExplorerView:
    """Everything 00_explore displays for one setting."""
    tokens: list[str]              # decoded context tokens
    kept: list[bool]               # per context token: kept in the chosen layer / KV head
    norms: torch.Tensor            # (H_kv, context_len) key norms of the chosen layer
    result: EvalResult             # PPL, accuracy, KL against the full cache on the scored part
    continuation: str              # greedy continuation from the compressed cache
    reference_continuation: str    # ... and from the full cache
    agreement: dict[str, float]
    seconds: float


class Explorer:
    """Holds one text's prefill so that each setting only re-compresses and re-scores.

    The first ``1 - score_fraction`` of the tokens is the context that gets compressed; the rest
    is scored teacher-forced (prefill protocol) and the continuation is generated after the context."""

    KEEP_RATIO_STEP = 0.05   # the keep_ratio slider's grid (0.05 .. 1.0)

    @staticmethod
    def check_setting(model: Any, keep_ratio: float, policy: str, skip_layers: Sequence[int],
                      position_mode: str, layer: int, kv_head: int, max_tokens: int) -> None:
        """Every explorer parameter against the model and the controls, before any prefill: a
        value the widgets would clamp or reject is an error naming the parameter."""
        EvalConfig(keep_ratio, policy, _check_layer_list("skip_layers", skip_layers), "original",
                   position_mode).validate(_n_layers(model))
        step = Explorer.KEEP_RATIO_STEP
        _require(abs(keep_ratio / step - round(keep_ratio / step)) < 1e-9, "keep_ratio", keep_ratio,
                 f"on the slider's grid: a multiple of {step} in [{step}, 1]")
        _check_prefill_policy("policy", policy)
        _require(isinstance(layer, int) and 0 <= layer < _n_layers(model), "layer", layer,
                 f"a layer index 0..{_n_layers(model) - 1}")
        n_kv = model.config.num_key_value_heads
        _require(isinstance(kv_head, int) and 0 <= kv_head < n_kv, "kv_head", kv_head, f"a KV head 0..{n_kv - 1}")
        limit = getattr(model.config, "max_position_embeddings", None)
        _positive_int("max_tokens", max_tokens)
        _require(limit is None or max_tokens <= limit, "max_tokens", max_tokens,
                 f"at most the model's {limit} positions")

    def __init__(self, model: Any, tokenizer: Any, text: str, max_tokens: int = 512,
                 score_fraction: float = 0.25, n_generate: int = 24) -> None:
        if not 0 < score_fraction < 1:
            raise ValueError(f"score_fraction={score_fraction!r}: must be in (0, 1)")
        self.model, self.tokenizer, self.n_generate = model, tokenizer, n_generate
        self.ids = encode(tokenizer, text, max_tokens)
        n = self.ids.shape[1]
        if n < 8:
            raise ValueError(f"text: {n} tokens; the explorer needs at least 8")
        self.context_len = max(2, min(n - 2, round(n * (1 - score_fraction))))
        self.pre = prefill(model, self.ids[:, :self.context_len], capture_hidden=True)
        self.new_ids = self.ids[:, self.context_len:-1]
        self.targets = self.ids[0, self.context_len + 1:].to(model.device)
        self.ref_logits = continuation_logits(model, self.pre.cache, self.new_ids)
        self.tokens = [tokenizer.decode([t]) for t in self.ids[0, :self.context_len].tolist()]
        self.reference_ids = generate_greedy(model, self.ids[:, :self.context_len], n_generate, pre=self.pre)
        self._scores: dict[tuple, list] = {}

    def view(self, keep_ratio: float, policy: str = "knorm", skip_layers: Sequence[int] = (0, 1),
             position_mode: PositionMode = "absolute", layer: int = 2, kv_head: int = 0,
             order: Order = "original") -> ExplorerView:
        t0 = time.perf_counter()
        cfg = EvalConfig(keep_ratio, policy, _check_layer_list("skip_layers", skip_layers), order, position_mode)
        cfg.validate(_n_layers(self.model))
        if not 0 <= layer < _n_layers(self.model):
            raise ValueError(f"layer={layer}: outside 0..{_n_layers(self.model) - 1}")
        if not 0 <= kv_head < self.pre.cache.keys[0].shape[1]:
            raise ValueError(f"kv_head={kv_head}: outside 0..{self.pre.cache.keys[0].shape[1] - 1}")
        key = (policy,)
        if key not in self._scores:
            self._scores[key] = policy_scores(self.pre.cache, policy, PolicyOptions(), self.pre.layer_inputs)
        cache = compress_cache(self.pre.cache, keep_ratio, policy, skip_layers, order, scores=self._scores[key])
        logits = continuation_logits(self.model, cache, self.new_ids, position_mode)
        m = token_metrics(logits, self.targets, self.ref_logits)
        result = EvalResult(cfg, m["nll"], m["correct"], m["kl"], m["top1_agree"],
                            _n_kept_reported(self.context_len, keep_ratio, skip_layers, self.model),
                            self.context_len, cache.nbytes())
        kept = torch.zeros(self.context_len, dtype=torch.bool)
        kept[cache.positions[layer][0, kv_head].cpu()] = True
        generated = generate_greedy(self.model, self.ids[:, :self.context_len], self.n_generate, keep_ratio, policy,
                                    skip_layers, order, position_mode, pre=self.pre)
        return ExplorerView(self.tokens, kept.tolist(), _norms(self.pre.cache.keys[layer])[0].cpu(), result,
                            self.tokenizer.decode(generated), self.tokenizer.decode(self.reference_ids),
                            generation_agreement(generated, self.reference_ids), time.perf_counter() - t0)


def norm_strip_html(norms: torch.Tensor, title: str = "") -> str:
    """Key norms ``(H_kv, positions)`` as rows of coloured cells (viridis, min to max), one row
    per KV head: plain HTML, so it renders the same in widgets, notebooks and browsers."""
    from matplotlib import colormaps

    lo, hi = float(norms.min()), float(norms.max())
    cmap = colormaps["viridis"]
    rows = []
    for head, row in enumerate(norms.tolist()):
        cells = "".join(
            '<span title="{:.2f}" style="flex:1;height:14px;background:#{:02x}{:02x}{:02x}"></span>'.format(
                v, *(int(255 * c) for c in cmap((v - lo) / (hi - lo + 1e-12))[:3])) for v in row)
        rows.append(f'<div style="display:flex;align-items:center"><span style="width:70px">KV head {head}</span>'
                    f'<div style="display:flex;flex:1">{cells}</div></div>')
    legend = f"<small>key L2 norm per context position: dark {lo:.1f} … bright {hi:.1f}</small>"
    return f'<div class="norm-strip"><b>{title}</b>{"".join(rows)}{legend}</div>'


def highlight_html(tokens: Sequence[str], kept: Sequence[bool]) -> str:
    """The context as HTML, kept tokens highlighted (``class="kept"``), evicted ones struck through."""
    import html as _html

    spans = []
    for tok, keep in zip(tokens, kept):
        text = _html.escape(tok).replace("\n", "↵<br>")
        cls, style = ("kept", "background:#c7e9c0") if keep else ("evicted", "color:#999;text-decoration:line-through")
        spans.append(f'<span class="{cls}" style="{style}">{text}</span>')
    return '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans) + "</div>"


# ----------------------------------------------------------------------------------------------
# 6. Metrics
# ----------------------------------------------------------------------------------------------

def token_metrics(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor,
                  chunk: int = 32) -> dict[str, torch.Tensor]:
    """Per-token NLL, correctness, KL(reference || logits) and top-1 agreement with the reference.

    Rows are processed in chunks, so memory stays at a few ``chunk x vocab`` blocks however long
    the text (``KL = sum p_ref (ref - x) - lse(ref) + lse(x)`` needs one exp pass)."""
    dtype = torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "correct": [], "kl": [], "top1_agree": []}
    for start in range(0, logits.shape[0], chunk):
        x, ref = logits[start:start + chunk].to(dtype), ref_logits[start:start + chunk].to(dtype)
        tgt = targets[start:start + chunk].view(-1, 1)
        lse, ref_lse = x.logsumexp(-1), ref.logsumexp(-1)
        ref_p = (ref - ref_lse[:, None]).exp_()
        kl = torch.linalg.vecdot(ref_p, ref) - torch.linalg.vecdot(ref_p, x) - ref_lse + lse
        pred = x.argmax(-1)
        parts["nll"].append((lse - x.gather(-1, tgt).squeeze(-1)).cpu())
        parts["kl"].append(kl.clamp_min(0.0).cpu())
        parts["correct"].append((pred == tgt.squeeze(-1)).cpu())
        parts["top1_agree"].append((pred == ref.argmax(-1)).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def keep_ratio_thresholds(rows: Sequence[dict[str, Any]], by: Sequence[str], tolerances: Sequence[float] = (0.01, 0.05),
                          metric: str = "ppl") -> Any:
    """Per ``by`` group: the smallest keep_ratio whose ``metric`` stays within each tolerance of the
    full cache (keep_ratio 1.0), where "within" means the mean over documents of
    ``metric / metric at 1.0`` is at most ``1 + tolerance`` at that keep_ratio *and at every larger
    one measured* (so a lucky dip below the line does not count). ``None`` where even the largest
    compressed keep_ratio fails. Rows need ``document``, ``keep_ratio`` and ``metric``; each group
    needs its own keep_ratio 1.0 rows."""
    import pandas as pd

    df = pd.DataFrame(rows)
    missing = {"document", "keep_ratio", metric, *by} - set(df.columns)
    if missing:
        raise ValueError(f"rows: missing column(s) {sorted(missing)}")
    for tol in tolerances:
        _require(isinstance(tol, numbers.Real) and tol >= 0, "tolerances", tolerances, "non-negative numbers")
    out = []
    for key, group in df.groupby(list(by), sort=False):
        full = group[group.keep_ratio == 1.0].set_index("document")[metric]
        if full.empty:
            raise ValueError(f"rows: group {key} has no keep_ratio 1.0 rows to compare with")
        rel = (group.assign(rel=group[metric] / group.document.map(full))
               .groupby("keep_ratio").rel.mean().sort_index(ascending=False))
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for tol in tolerances:
            smallest = None
            for keep_ratio, ratio in rel.items():
                if ratio > 1 + tol:
                    break
                smallest = keep_ratio
            row[f"within_{tol:g}"] = None if smallest == 1.0 else smallest
        out.append(row)
    return pd.DataFrame(out)


def generation_agreement(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Matching-prefix length and per-position token agreement of two greedy generations."""
    n = min(len(generated), len(reference))
    same = (generated[:n] == reference[:n])
    mismatch = (~same).nonzero()
    prefix = int(mismatch[0]) if len(mismatch) else n
    return {"matching_prefix": prefix, "token_agreement": same.float().mean().item() if n else float("nan")}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95 %) for a success rate of ``successes`` out of ``n``."""
    _positive_int("n", n)
    if not isinstance(successes, numbers.Integral) or not 0 <= successes <= n:
        raise ValueError(f"successes={successes!r}: must be an int in 0 .. n={n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def aggregate(rows: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> Any:
    """Mean, 95 % t-interval half-width, min, max and count of ``metrics`` over the rows of each
    ``by`` group (rows are usually one per document), as a pandas DataFrame."""
    import pandas as pd
    from scipy import stats

    df = pd.DataFrame(rows)
    df = df.assign(**{k: df[k].map(lambda v: tuple(v) if isinstance(v, list) else v) for k in by})
    out = []
    for key, group in df.groupby(list(by), sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            vals = group[m].astype(float)
            n = len(vals)
            half = float(stats.t.ppf(0.975, n - 1) * vals.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            row.update({m: vals.mean(), f"{m}_ci95": half, f"{m}_min": vals.min(), f"{m}_max": vals.max()})
        row["n_docs"] = len(group)
        out.append(row)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------
# 7. Timing
# ----------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """What ran this: for every recorded result and benchmark line."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; median and spread in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1], "times_s": times}


PROFILES: tuple[str, ...] = ("quick", "full", "large")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: must be a positive int")


def _check_list(name: str, v: Any, check: Callable[[Any], None]) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}={v!r}: must be a non-empty list")
    for item in v:
        check(item)


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {what}")


def _check_prefill_policy(name: str, policy: Any) -> None:
    resolve_policy(policy)
    _require(policy not in DYNAMIC_POLICIES, name, policy,
             "a policy whose score is fixed once the key exists; h2o is dynamic: streaming protocol only")


PARAMETER_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "profile": lambda n, v: _check_choice(n, v, PROFILES),
    "model_name": lambda n, v: _require(v is None or isinstance(v, str), n, v,
                                        "None (embedded model) or a Hugging Face id / local path"),
    "device": lambda n, v: _require(isinstance(v, str) and v.split(":")[0] in ("cpu", "cuda", "mps", "auto"), n, v,
                                    "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"),
    "keep_ratios": lambda n, v: _check_list(n, v, lambda r: _check_keep_ratio(r)),
    "policies": lambda n, v: _check_list(n, v, lambda p: _check_prefill_policy(n, p)),
    "streaming_policies": lambda n, v: _check_list(n, v, lambda p: _check_choice(n, p, tuple(POLICIES))),
    "corpora": lambda n, v: _check_list(n, v, lambda c: _check_choice(n, c, CORPORA)),
    "position_modes": lambda n, v: _check_list(n, v, lambda m: _check_choice(n, m, POSITION_MODES)),
    "orders": lambda n, v: _check_list(n, v, lambda o: _check_choice(n, o, ORDERS)),
    "keep_ratio": lambda n, v: _check_keep_ratio(v) and None,
    "policy": _check_prefill_policy,
    "skip_layers": lambda n, v: _require(isinstance(v, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in v),
                                         n, v, "a list of layer indices"),
    "position_mode": lambda n, v: _check_choice(n, v, POSITION_MODES),
    "text": lambda n, v: _require(v is None or (isinstance(v, str) and bool(v.strip())), n, v,
                                  "None (a wiki article) or non-empty text"),
}


def notebook_parameters(namespace: dict[str, Any], declared: set[str], before: dict[str, Any]) -> dict[str, Any]:
    """Validate a notebook's parameters; return them as a dict.

    ``before``: a copy of the globals before the ``parameters`` cell (``dict(globals())``);
    ``declared``: the names at its end. Papermill injects overrides in a cell after it and only
    *warns* on unknown names, so a new global that the parameters cell did not declare, or a
    rebinding of a name defined before it (an import such as ``stats``), is an error here. Names
    starting with ``_`` are IPython's or the notebook's plumbing, never parameters. Known names get
    the checks in ``PARAMETER_CHECKS``; ints named ``n_*``, ``*_len`` or ``*_tokens`` must be positive."""
    names = sorted(n for n in declared - set(before) if not n.startswith("_"))
    unknown = sorted(n for n in set(namespace) - declared if not n.startswith("_"))
    rebound = sorted(n for n, v in before.items() if not n.startswith("_") and namespace.get(n, v) is not v)
    if unknown or rebound:
        raise ValueError(f"unknown parameter(s) {unknown + rebound}: this notebook accepts {names}")
    params = {n: namespace[n] for n in names}
    for name, value in params.items():
        if name in PARAMETER_CHECKS:
            PARAMETER_CHECKS[name](name, value)
        elif (name.startswith("n_") or name.endswith("_len") or name.endswith("_tokens")) and value is not None:
            _positive_int(name, value)  # None: take the profile's default
    return params


def record_results(notebook: str, profile: str, parameters: dict[str, Any], results: dict[str, Any],
                   model: Any | None = None) -> Path:
    """Write ``<RESULTS_DIR>/<notebook>/<profile>.json`` atomically, with what produced it, then
    publish the figures this process saved for the notebook: a run that fails before recording
    its results leaves no figure behind."""
    import hashlib

    identity: dict[str, Any] = {"knorm_lib_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                                "corpora_sha256": {p.stem: file_sha256(p) for p in sorted(_VERIFIED_CORPORA)}}
    if model is not None:
        identity.update(model_name=getattr(model, "name_or_path", None), dtype=str(model.dtype),
                        n_layers=_n_layers(model), n_params=sum(p.numel() for p in model.parameters()))
    path = RESULTS_DIR / notebook / f"{profile}.json"
    write_json_atomic(path, {"notebook": notebook, "profile": profile, "parameters": parameters,
                             "identity": identity, "machine": machine_info(),
                             "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results})
    for pending, final in _PENDING_FIGURES.pop(notebook, {}).items():
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(pending, final)   # a rename within one file system
    return path


_PENDING_FIGURES: dict[str, dict[Path, Path]] = {}   # notebook -> {staged file: final path}


def save_figure(fig: Any, notebook: str, name: str, profile: str = "full", dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG (>= 150 dpi) for ``<FIGURES_DIR>/<notebook>/<name>.png``
    (default ``build/figures/<profile>/``; `make report` points it at the committed ``figures/``).
    The file is staged under ``build/`` and only moved there by ``record_results``. Returns the
    final path."""
    base = FIGURES_DIR if FIGURES_DIR is not None else PROJECT_ROOT / "build" / "figures" / profile
    path = base / notebook / f"{name}.png"
    staged = PROJECT_ROOT / "build" / "staged-figures" / str(os.getpid()) / notebook / f"{name}.png"
    staged.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(staged, dpi=max(dpi, 150), bbox_inches="tight")
    _PENDING_FIGURES.setdefault(notebook, {})[staged] = path
    return path


def _finite(obj: Any) -> Any:
    """NaN and infinities become ``null`` (they are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file and ``os.replace`` so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    except RecursionError as err:
        raise ValueError("obj: circular or too deeply nested to write as JSON") from err
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


# Speed study (06_speed_tradeoffs): exact bytes, peak memory, timed decode, machine rates, cold starts

def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters, each shared tensor (tied embeddings) counted once:
    what one decode step must stream from memory besides the KV cache."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _malloc_trim() -> None:
    """glibc only: return free heap memory to the OS (otherwise freed memory stays resident)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], interval_s: float = 0.005, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once; return its result and the peak memory while it ran.

    CPU: resident memory sampled every ``interval_s`` by a background thread (short spikes between
    samples can be missed; on glibc, free heap memory is trimmed first so that the resident set
    tracks live memory). CUDA: the allocator's exact peak.
    ``increase_bytes`` is the peak above the memory held just before the call."""
    import threading

    if not isinstance(interval_s, numbers.Real) or not interval_s > 0:
        raise ValueError(f"interval_s={interval_s!r}: must be a positive number of seconds")
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return result, {"kind": "cuda_allocated", "baseline_bytes": base, "peak_bytes": peak,
                        "increase_bytes": peak - base}
    _malloc_trim()  # hand freed heap pages back first, so the resident set tracks live memory
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return result, {"kind": "rss", "baseline_bytes": base, "peak_bytes": peak[0], "increase_bytes": peak[0] - base}


def _sync(device: Any) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def timed_decode(model: Any, cache: KVCache, first_token: torch.Tensor, n_tokens: int, warmup: int = 2,
                 position_mode: PositionMode = "absolute") -> dict[str, Any]:
    """Greedy decoding of ``n_tokens`` tokens after ``first_token`` on ``cache``, one forward per
    token, each step timed (device synchronised). The first ``warmup`` steps are run but not
    reported. New tokens are numbered exactly as in ``generate_greedy`` (true positions under
    ``absolute``); ``cache`` itself is never modified. Returns per-step seconds, their median
    (TPOT) and the tokens generated."""
    _positive_int("n_tokens", n_tokens)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be an int >= 0")
    cache, position = _numbered(cache, model, position_mode)
    token = first_token.to(model.device).view(1, 1)
    dyn = cache.to_transformers()
    times, tokens = [], []
    for _ in range(warmup + n_tokens):
        _sync(model.device)
        t0 = time.perf_counter()
        token = _greedy_step(model, dyn, token, position)
        _sync(model.device)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
        position += 1
    steps = times[warmup:]
    ordered = sorted(steps)
    return {"step_s": steps, "warmup_step_s": times[:warmup], "median_s": ordered[len(ordered) // 2],
            "q25_s": ordered[len(ordered) // 4], "q75_s": ordered[(3 * len(ordered)) // 4],
            "min_s": ordered[0], "max_s": ordered[-1], "tokens": torch.cat(tokens, dim=1)[0].cpu().tolist()}


@torch.inference_mode()
def time_ttft(model: Any, input_ids: torch.Tensor, keep_ratios: Sequence[float], policies: Sequence[str] = ("knorm",),
              skip_layers: Sequence[int] = (0, 1), repeats: int = 5, warmup: int = 1) -> tuple[dict[str, Any], Prefill]:
    """Time-to-first-token pieces for one context: each repeat runs one prefill (the first token is
    the argmax of its last logits) and then compresses that same cache under every
    (policy, keep_ratio); TTFT of a configuration in a repeat = that prefill + that compression.
    ``keep_ratio`` 1.0 means no compression (0 s). ``warmup`` untimed prefills run first; the first
    of them is watched by ``peak_memory``. Returns the timings (seconds per repeat) and the last prefill."""
    _positive_int("repeats", repeats)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be an int >= 0")
    ratios = [_check_keep_ratio(r) for r in keep_ratios]
    if not ratios or not policies:
        raise ValueError("keep_ratios, policies: need at least one of each")
    for p in policies:
        resolve_policy(p)
    input_ids = _check_ids(input_ids).to(model.device)
    device = model.device
    pre, memory = peak_memory(lambda: prefill(model, input_ids), device=str(device)) if warmup else (None, None)
    for _ in range(max(warmup - 1, 0)):
        pre = prefill(model, input_ids)
    prefill_s: list[float] = []
    compress_s: dict[str, list[float]] = {f"{p}@{r}": [] for p in policies for r in ratios}
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        pre = prefill(model, input_ids)
        pre.last_logits.argmax(-1).item()
        _sync(device)
        prefill_s.append(time.perf_counter() - t0)
        for p in policies:
            for r in ratios:
                if r == 1.0:
                    compress_s[f"{p}@{r}"].append(0.0)
                    continue
                _sync(device)
                t0 = time.perf_counter()
                compress_cache(pre.cache, r, p, skip_layers)
                _sync(device)
                compress_s[f"{p}@{r}"].append(time.perf_counter() - t0)
    ttft_s = {k: [a + b for a, b in zip(prefill_s, v)] for k, v in compress_s.items()}
    return {"n_tokens": int(input_ids.shape[1]), "prefill_s": prefill_s, "compress_s": compress_s, "ttft_s": ttft_s,
            "prefill_peak_memory": memory}, pre


def memory_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """This machine's memory bandwidth (bytes/s, median over ``repeats`` after one warm-up) three
    ways, on float32 buffers of ``n_bytes`` (far larger than a CPU cache): ``read`` (a sum),
    ``copy`` (read + write counted) and ``gemv`` (a matrix-vector product streaming the matrix,
    which is what a decode step does with every weight)."""
    _positive_int("n_bytes", n_bytes)
    _positive_int("repeats", repeats)
    n = n_bytes // 4
    cols = 4096
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    w = x[: (n // cols) * cols].view(-1, cols)
    v = torch.rand(cols, device=device)
    out: dict[str, Any] = {"n_bytes": n * 4}
    for name, fn, moved in [("read", lambda: x.sum(), n * 4), ("copy", lambda: y.copy_(x), 2 * n * 4),
                            ("gemv", lambda: w @ v, w.numel() * 4)]:
        t = timed(lambda: (fn(), _sync(device)), repeats=repeats, warmup=1)
        out[f"{name}_bytes_per_s"] = moved / t["median_s"]
        out[f"{name}_s"] = t["times_s"]
    return out


def matmul_rate(n: int = 1024, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Arithmetic rate of an ``n x n`` matrix product (FLOP/s = 2 n^3 / median time), after one warm-up."""
    _positive_int("n", n)
    _positive_int("repeats", repeats)
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    t = timed(lambda: (a @ b, _sync(device)), repeats=repeats, warmup=1)
    return {"n": n, "dtype": str(dtype), "flop_per_s": 2 * n**3 / t["median_s"], "times_s": t["times_s"]}


def op_profile(fn: Callable[[], Any], top: int = 10) -> list[dict[str, Any]]:
    """Run ``fn`` under ``torch.profiler``; the ``top`` operators by self CPU time, with their
    share of the profiled wall time and call counts (where a decode step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    _positive_int("top", top)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             "share_of_wall": e.self_cpu_time_total / 1e6 / wall} for e in events[:top]]


@torch.inference_mode()
def decode_profile(model: Any, cache: KVCache, first_token: torch.Tensor, n_steps: int = 3, top: int = 10,
                   position_mode: PositionMode = "absolute") -> list[dict[str, Any]]:
    """``op_profile`` of ``n_steps`` decode steps on ``cache`` (true positions under ``absolute``),
    numbered as in ``timed_decode``. The copy into a ``DynamicCache`` happens before the profiled
    region, so the profile holds only what every step pays."""
    _positive_int("n_steps", n_steps)
    cache, position = _numbered(cache, model, position_mode)
    dyn = cache.to_transformers()
    state = {"token": first_token.to(model.device).view(1, 1), "position": position}

    def steps() -> None:
        for _ in range(n_steps):
            state["token"] = _greedy_step(model, dyn, state["token"], state["position"])
            state["position"] += 1
        _sync(model.device)

    return op_profile(steps, top)


_COLD_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
spec = json.loads(sys.stdin.read())
import torch
import knorm_lib as kl
def sync():
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
t_import = time.perf_counter()
if spec["model_config"] is not None:
    model = kl.random_llama(seed=0, dtype=getattr(torch, spec["dtype"]), device=spec["device"], **spec["model_config"])
else:
    model, _ = kl.load_model(spec["model_name"], device=spec["device"], dtype=spec["dtype"])
ids = torch.tensor([spec["input_ids"]])
t_load = time.perf_counter()
rows = []
for rnd in range(spec["rounds"]):
    for r in spec["keep_ratios"]:
        sync()
        t0 = time.perf_counter()
        pre = kl.prefill(model, ids)
        if r < 1:
            kl.compress_cache(pre.cache, r, spec["policy"], spec["skip_layers"])
        pre.last_logits.argmax(-1).item()
        sync()
        rows.append({"round": rnd, "keep_ratio": r, "ttft_s": time.perf_counter() - t0})
print("COLD_JSON " + json.dumps({"import_s": t_import - t_start, "load_s": t_load - t_import, "rows": rows}))
"""


def cold_warm_ttft(input_ids: torch.Tensor, keep_ratios: Sequence[float] = (1.0, 0.25), rounds: int = 3,
                   model_name: str | None = None, model_config: dict[str, Any] | None = None,
                   device: str = "cpu", dtype: str = "float32", policy: str = "knorm",
                   skip_layers: Sequence[int] = (0, 1), timeout_s: float = 600) -> dict[str, Any]:
    """The TTFT trap, measured: in a *fresh* Python process, load the model and time
    prefill + compression + first token for each keep_ratio in order, ``rounds`` times. Round 0's
    first configuration (put the baseline first) is the process's first call: it pays lazy
    initialisation, allocator and kernel warm-up. Returns the child's rows (round, keep_ratio,
    ttft_s) and its import and load times. ``model_config`` builds a random-weight Llama instead."""
    import subprocess
    import sys

    ratios = [_check_keep_ratio(r) for r in keep_ratios]
    _positive_int("rounds", rounds)
    if not ratios:
        raise ValueError("keep_ratios: need at least one")
    if model_config is not None and not isinstance(model_config, dict):
        raise ValueError(f"model_config={model_config!r}: must be None or a dict of LlamaConfig fields")
    ids = _check_ids(input_ids)
    spec = {"input_ids": ids[0].tolist(), "keep_ratios": ratios, "rounds": rounds, "model_name": model_name,
            "model_config": model_config, "device": device, "dtype": dtype, "policy": policy,
            "skip_layers": list(skip_layers)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _COLD_CHILD], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COLD_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cold_warm_ttft: the fresh process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("COLD_JSON "):])


PARAMETER_CHECKS.update({
    "context_lens": lambda n, v: v is None or _check_list(n, v, lambda x: _positive_int(n, x)),
    "cold_lens": lambda n, v: v is None or _check_list(n, v, lambda x: _positive_int(n, x)),
    "model_config": lambda n, v: _require(v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
                                          n, v, "None (the model named by model_name) or a dict of LlamaConfig fields"),
    "dtype": lambda n, v: _require(v is None or isinstance(getattr(torch, str(v), None), torch.dtype), n, v,
                                   "None or a torch dtype name such as 'float32' or 'bfloat16'"),
})
