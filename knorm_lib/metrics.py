"""6. Metrics: per-token NLL, correctness, KL from the uncompressed model and top-1 agreement with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Reference", "token_metrics"]


def _metrics_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class Reference:
    """The uncompressed logits ``(T, vocab)`` with their per-row terms for ``token_metrics``
    (log-sum-exp, ``sum p_ref * ref``, argmax), computed once per sweep, and (``reference_forward``)
    the hidden state that entered some layers in that forward."""
    logits: torch.Tensor
    lse: torch.Tensor
    self_dot: torch.Tensor
    top1: torch.Tensor
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, logits: torch.Tensor, dtype: torch.dtype | None = None, chunk: int = 32,
           layer_inputs: dict[int, torch.Tensor] | None = None) -> "Reference":
        dtype = dtype or _metrics_dtype(logits)
        parts: tuple[list[torch.Tensor], ...] = ([], [], [])
        for start in range(0, logits.shape[0], chunk):
            ref = logits[start:start + chunk].to(dtype)
            lse = ref.logsumexp(-1)
            for out, value in zip(parts, (lse, torch.linalg.vecdot((ref - lse[:, None]).exp_(), ref), ref.argmax(-1))):
                out.append(value)
        return cls(logits, *(torch.cat(v) for v in parts), layer_inputs or {})

    def __getitem__(self, rows: slice) -> "Reference":
        return Reference(self.logits[rows], self.lse[rows], self.self_dot[rows], self.top1[rows])


def token_metrics(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | Reference,
                  chunk: int = 32) -> dict[str, torch.Tensor]:
    """Per-token NLL, correctness, KL(reference || logits) and top-1 agreement with the reference,
    in row chunks (memory: a few ``chunk x vocab`` blocks; ``KL = sum p_ref (ref - x) - lse(ref) +
    lse(x)`` needs one exp pass)."""
    ref_all = ref_logits if isinstance(ref_logits, Reference) else Reference.of(ref_logits, chunk=chunk)
    dtype = _metrics_dtype(logits, ref_all.logits)
    if ref_all.lse.dtype != dtype:
        ref_all = Reference.of(ref_all.logits, dtype, chunk)
    targets = targets.to(logits.device)
    ref_all = Reference(*(t.to(logits.device) for t in (ref_all.logits, ref_all.lse, ref_all.self_dot, ref_all.top1)))
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "correct": [], "kl": [], "top1_agree": []}
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        x, ref, ref_lse = logits[rows].to(dtype), ref_all.logits[rows].to(dtype), ref_all.lse[rows]
        tgt = targets[rows].view(-1, 1)
        lse = x.logsumexp(-1)
        ref_p = (ref - ref_lse[:, None]).exp_()
        kl = ref_all.self_dot[rows] - torch.linalg.vecdot(ref_p, x) - ref_lse + lse
        pred = x.argmax(-1)
        parts["nll"].append((lse - x.gather(-1, tgt).squeeze(-1)).cpu())
        parts["kl"].append(kl.clamp_min(0.0).cpu())
        parts["correct"].append((pred == tgt.squeeze(-1)).cpu())
        parts["top1_agree"].append((pred == ref_all.top1[rows]).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
