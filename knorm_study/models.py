"""Loading a model for the study: the embedded SmolLM2-135M-Instruct (the default) or Gemma 3 270M
(``"gemma-3-270m"``), a Hugging Face id or a local directory, with knorm_lib's attention function,
refused at load time when knorm_lib cannot evaluate it exactly (``kl.check_supported``). knorm_lib
re-exports ``load_model`` (``kl.load_model``) and ``embedded_model_dir``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import knorm_lib as kl

EXPORTED = ("load_model", "_looks_like_path", "_hub_reachable", "EMBEDDED_MODELS", "embedded_model_dir")

# The models `make data` embeds, by short name (their folders under data/models/); None: the default
EMBEDDED_MODELS: tuple[str, ...] = ("SmolLM2-135M-Instruct", "gemma-3-270m")


def embedded_model_dir(name: str | os.PathLike | None) -> Path | None:
    """The folder of an embedded model named by its short name (``None``: the default,
    SmolLM2-135M-Instruct), whether or not ``make data`` has built it yet; ``None`` for any other name."""
    if name is None or str(name) == kl.DEFAULT_MODEL_DIR.name:
        return kl.DEFAULT_MODEL_DIR
    return kl.DATA_DIR / "models" / str(name) if str(name) in EMBEDDED_MODELS else None


def _declares_bos(source: str, local_only: bool) -> bool:
    """The tokenizer's ``tokenizer_config.json`` sets ``add_bos_token``: true (transformers 5 drops
    that key when a ``tokenizer.json`` is there, so ``load_model`` sets it back)."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(source, "tokenizer_config.json", local_files_only=local_only,
                           _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return False
    if path is None:
        return False
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("add_bos_token") is True
    except (OSError, ValueError, AttributeError):
        return False


def _looks_like_path(name: str) -> bool:
    # Hugging Face ids look like "org/name"; so may "dir/name" when "dir" is a local directory
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline (``HF_HUB_OFFLINE``) or the hub does not answer within ``timeout_s``, so a
    missing model fails at once, not after the hub client's minute of retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_model(name: str | os.PathLike | None = None, device: str = "cpu",
               dtype: torch.dtype | str = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode with knorm_lib's attention function: an embedded model
    (``name=None``: SmolLM2-135M-Instruct; ``"gemma-3-270m"``: Gemma 3 270M; both cached by
    ``make data``), a Hugging Face id or a local directory. Safetensors only, ``trust_remote_code``
    off; ``device="auto"``: accelerate's ``device_map="auto"`` for a model larger than one GPU. A
    tokenizer whose config declares ``add_bos_token`` gets it set (``kl.encode`` then puts BOS first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kl._check_device(device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kl._register_attention()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype (try 'float32' or 'bfloat16')")
        dtype = getattr(torch, dtype)
    embedded = embedded_model_dir(name)
    if embedded is not None:
        source = str(embedded)
        if not (embedded / "model.safetensors").exists():
            raise FileNotFoundError(f"load_model(name={None if name is None else str(name)!r}): the embedded model is "
                                    f"not at {embedded}; run `make data` first")
    else:
        source = str(Path(name).expanduser()) if _looks_like_path(str(name)) else str(name)
        if _looks_like_path(str(name)) and not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"load_model(name={str(name)!r}): no model directory with a config.json there")
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=kl.ATTN_IMPLEMENTATION,
                                  trust_remote_code=False, use_safetensors=True)
    if device == "auto":
        kwargs["device_map"] = "auto"
    def load(local_only: bool) -> tuple[Any, Any]:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
        kl._check_config(cfg, (getattr(cfg, "architectures", None) or [cfg.model_type])[0])
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
        if not getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None \
                and _declares_bos(source, local_only):
            tok.add_bos_token = True
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs), tok

    try:
        model, tokenizer = load(local_only=True)   # a local directory or the Hugging Face cache
    except OSError as err:
        if embedded is not None or _looks_like_path(str(name)) or not _hub_reachable():
            raise FileNotFoundError(f"load_model(name={str(name)!r}): not a local model directory and not in the "
                                    f"Hugging Face cache, and the hub is not reachable ({err})") from err
        try:
            model, tokenizer = load(local_only=False)
        except OSError as err2:
            raise FileNotFoundError(f"load_model(name={str(name)!r}): cannot load it from the hub ({err2})") from err2
    kl.check_supported(model)
    if device != "auto":
        model.to(device)
    model.eval()
    return model, tokenizer
