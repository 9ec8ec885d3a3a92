"""kvpress presses of this project, for kvpress users: each drops into kvpress's pipeline like its own.

    from kvpress import KVPressTextGenerationPipeline  # or: with press(model): model(...)
    from knorm_study.presses import PrenormKnormPress
    pipe(context, question=question, press=PrenormKnormPress(compression_ratio=0.5))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvpress import ScorerPress

import knorm_lib as kl


@dataclass
class PrenormKnormPress(ScorerPress):
    """KnormPress scored on the key before QK-norm (``kl.knorm_prenorm_score``): keeps the tokens
    whose ``k_proj`` output has the lowest L2 norm. kvpress's own ``KnormPress`` reads the cached
    key, which QK-norm (Qwen 3, OLMo 2, Gemma 3) has rescaled; on a model without QK-norm both
    rank the same."""

    def score(self, module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        layer = kl.LayerKV(keys, values, None, module.layer_idx, module=module, hidden_states=hidden_states)
        return kl.POLICIES["knorm_prenorm"](layer, kl.PolicyOptions())
