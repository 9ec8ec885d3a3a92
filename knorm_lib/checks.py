"""1. Input checks: every entry point runs these before heavy work; errors name the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Literal

import torch

__all__ = ["PositionMode", "Order", "POSITION_MODES", "ORDERS"]


PositionMode = Literal["absolute", "cache_relative", "rerotated"]
Order = Literal["original", "by_norm"]
POSITION_MODES: tuple[str, ...] = ("absolute", "cache_relative", "rerotated")
ORDERS: tuple[str, ...] = ("original", "by_norm")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: must be a positive int")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {what}")


def _check_list(name: str, v: Any, check: Callable[[Any], None]) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}={v!r}: must be a non-empty list")
    for item in v:
        check(item)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")


def _check_keep_ratio(keep_ratio: float) -> float:
    if not isinstance(keep_ratio, numbers.Real) or isinstance(keep_ratio, bool) or math.isnan(keep_ratio) \
            or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio!r}: must be a number in (0, 1]")
    return float(keep_ratio)


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


def _check_device(device: Any) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (accelerate's device_map); MPS is refused because the tie
    rule and the metrics compute in float64, which MPS does not have."""
    kind = device.split(":")[0] if isinstance(device, str) else None
    if kind == "mps":
        raise ValueError("device='mps': not supported (knorm_lib breaks ties and computes metrics in float64, "
                         "which MPS lacks); use 'cpu'")
    _require(kind in ("cpu", "cuda", "auto") and (kind != "auto" or device == "auto"), "device", device,
             "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here")
    return device


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


def _check_vocab(model: Any, input_ids: torch.Tensor) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if (vocab is not None and int(input_ids.max()) >= vocab) or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: token ids must lie in 0..{vocab} - 1 (the model's vocabulary); "
                         f"got {int(input_ids.min())}..{int(input_ids.max())}")


def _check_context_len(context_len: int, n_tokens: int) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool) or not 1 <= context_len < n_tokens - 1:
        raise ValueError(f"context_len={context_len!r}: must be an int with 1 <= context_len < number of "
                         f"tokens - 1 = {n_tokens - 1} (at least two tokens must follow the context)")
