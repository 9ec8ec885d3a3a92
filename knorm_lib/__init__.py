"""knorm_lib: KnormPress (keep the keys with the lowest L2 norm) and its measurement, exactly.

One module per step, read in this order (each imports only the ones before it):

1. ``checks``: input checks; every entry point runs them before heavy work, errors name the argument.
2. ``attention``: the attention function the models run with, its masks (causal, evicted, sliding
   window, as positions) and the models it supports (loading: ``knorm_study/models.py``).
3. data: ``knorm_study/texts.py`` (corpora, documents, token sequences), its names re-exported here.
4. ``policies``: scores (higher = keep; ``register_policy``).
5. ``compression``: what is kept (``keep_indices`` holds the tie rule), re-rotation, KV footprint.
6. ``metrics``: per-token metrics against the uncompressed model.
7. ``prefill_protocol``: kvpress's protocol, compress once after the context (``prefill_ppl``, ``sweep``).
8. ``streaming_protocol``: the paper's LM protocol (``streaming_ppl``, ``streaming_sweep``).

Every name is re-exported here, so ``import knorm_lib as kl`` and ``kl.<name>`` reach all of
them. The study machinery lives in ``knorm_study``, which imports this package (``load_model``
and section 3's names are knorm_study.models' and .texts', re-exported).

How to choose ``position_mode`` (the write-up's pitfall lives here):

* ``"absolute"``: new tokens keep their true positions. Correct: RoPE rotated every cached key
  at its own position, so attention over the kept keys is a set operation.
* ``"cache_relative"``: new tokens are numbered from the compressed cache length, what
  ``model(new_ids, past_key_values=cache)`` does without ``position_ids`` (transformers reads
  layer 0's length). Queries sit at the wrong distance from every key: the write-up's 39.68 ->
  155.91 jump.
* ``"rerotated"``: kept keys are re-rotated to contiguous slots in storage order and new tokens
  follow them (StreamingLLM's pos-shift, kvpress's ``KeyRerotationPress``). Only here does
  storage order (``order="by_norm"``) matter.

Evaluation is unpadded; the attention function builds its causal mask from each layer's own key
length, so layers may hold caches of different lengths (``skip_layers``), and a sliding-window
layer's mask from its keys' true positions (``sliding_layers``), never from a cache length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from knorm_lib.checks import *  # noqa: F401,F403
from knorm_lib.attention import *  # noqa: F401,F403
from knorm_lib.policies import *  # noqa: F401,F403
from knorm_lib.compression import *  # noqa: F401,F403
from knorm_lib.metrics import *  # noqa: F401,F403
from knorm_lib.prefill_protocol import *  # noqa: F401,F403
from knorm_lib.streaming_protocol import *  # noqa: F401,F403
# the private helpers the study modules and the tests reach
from knorm_lib.checks import (_check_choice, _check_context_len, _check_device, _check_ids,  # noqa: F401
                              _check_keep_ratio, _check_layer_list, _check_list, _positive_int, _require)
from knorm_lib.attention import (_CPU_KEY_BLOCK, _attention, _check_config, _head_dim, _layers,  # noqa: F401
                                 _n_layers, _over, _register_attention, _streaming_attention)
from knorm_lib.policies import _norms  # noqa: F401
from knorm_lib.compression import _layer_type  # noqa: F401
from knorm_lib.prefill_protocol import _first_compressed, _numbered  # noqa: F401
from knorm_lib.streaming_protocol import _per_kv_head  # noqa: F401

__all__ = [
    "load_model", "check_supported", "recording_attention", "grouped_decoding",
    "LayerKV", "PolicyOptions", "POLICIES", "DYNAMIC_POLICIES", "KVPRESS_POLICIES", "LAYER_INPUT_POLICIES",
    "register_policy", "needs_layer_inputs", "has_qk_norm", "sliding_layers", "resolve_policy", "check_policy",
    "n_kept_for", "KVCache", "keep_indices", "storage_order", "policy_scores", "compress_cache", "rerotate_keys",
    "Reference", "token_metrics",
    "Prefill", "prefill", "continuation_logits", "full_logits", "reference_forward", "full_ppl",
    "EvalConfig", "EvalResult", "evaluate", "sweep", "prefill_ppl",
    "StreamingConfig", "budget_schedule", "eviction_steps", "dynamic_eviction_steps", "streaming_mask",
    "streaming_ppl", "streaming_sweep",
    "POSITION_MODES", "ORDERS", "LAYER_SCOPES", "layers_to_skip", "footprint",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("KNORM_DATA_DIR", PROJECT_ROOT / "data"))
DEFAULT_MODEL_DIR = DATA_DIR / "models" / "SmolLM2-135M-Instruct"
CORPUS_DIR = DATA_DIR / "corpora"


def __getattr__(name: str) -> Any:
    """The names knorm_study's ``texts`` and ``models`` define (the notebooks call ``kl.load_model``,
    ``kl.long_documents``), imported on first use: those modules import this one."""
    from knorm_study import models, texts

    for module in (texts, models):
        if name in module.EXPORTED:
            return getattr(module, name)
    raise AttributeError(f"module 'knorm_lib' has no attribute {name!r}")
