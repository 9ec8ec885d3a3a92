"""Passkey retrieval (05_passkey_retrieval): the samples, the answer span's metrics, and the study's
analysis (accuracy with Wilson intervals, the 90 % claim, sweep speed, generation agreement, findings)."""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import knorm_lib as kl
from knorm_study import decode, intervals, quality

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

    kl._positive_int("digits", digits)
    rng = random.Random(f"passkey:{seed}:{context_tokens}:{float(depth)!r}")
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def passkey_prompt(tokenizer: Any, context_tokens: int, depth: float, key: str) -> PasskeyPrompt:
    """Build a LongLoRA / landmark-style passkey sample whose context is exactly ``context_tokens``.

    The filler (``PASSKEY_FILLER`` repeated, cut to length at the token level) surrounds the line
    "The pass key is KEY. Remember it. KEY is the pass key.", inserted at the sentence boundary
    nearest ``depth`` (0.0: first, 1.0: last) of the filler. The user turn is wrapped in the
    tokenizer's chat template when it has one (plain text otherwise); BOS first where the tokenizer
    declares it (``kl.bos_first``)."""
    if not isinstance(key, str) or not key.isdigit():
        raise ValueError(f"key={key!r}: must be a non-empty string of digits")
    if not isinstance(depth, numbers.Real) or isinstance(depth, bool) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: must be a number in [0, 1]")
    kl._positive_int("context_tokens", context_tokens)
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
    bos = kl.bos_first(tokenizer)   # BOS first where the tokenizer declares it (unless its template put it there)
    if bos is not None and (len(head_ids) == 0 or head_ids[0].item() != bos):
        head_ids = torch.cat([torch.tensor([bos], dtype=head_ids.dtype), head_ids])
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


def span_metrics(result: kl.EvalResult, start: int, end: int | None = None) -> dict[str, Any]:
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


# ---- the study (05_passkey_retrieval): samples, sweeps, accuracy, the 90 % claim, speed, generation ----

def check_sizes(sizes: dict[str, Any], keep_ratios: Sequence[float]) -> None:
    """The notebook's sizes: one positive seed count per context, depths in [0, 1], and keep_ratio
    1.0 (the uncompressed reference) among ``keep_ratios``."""
    if len(sizes["seeds"]) != len(sizes["contexts"]) or not all(isinstance(n, int) and n >= 1 for n in sizes["seeds"]):
        raise ValueError(f"seeds={sizes['seeds']!r}: needs one positive int per context ({len(sizes['contexts'])})")
    for name in ("depths", "long_depths"):
        if not sizes[name] or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in sizes[name]):
            raise ValueError(f"{name}={sizes[name]!r}: must be a non-empty list of numbers in [0, 1]")
    if 1.0 not in keep_ratios:
        raise ValueError(f"keep_ratios={list(keep_ratios)!r}: must include 1.0 (the uncompressed reference)")


def samples(sizes: dict[str, Any]) -> list[tuple[int, int, float]]:
    """Every (context, seed, depth): ``seeds[i]`` keys per depth at ``contexts[i]``, at ``depths``
    up to 2048 tokens and ``long_depths`` above."""
    return [(ctx, seed, float(depth)) for ctx, n_seeds in zip(sizes["contexts"], sizes["seeds"])
            for seed in range(n_seeds) for depth in (sizes["depths"] if ctx <= 2048 else sizes["long_depths"])]


def sample_prompt(model: Any, tokenizer: Any, context: int, seed: int, depth: float) -> PasskeyPrompt:
    """The sample ``(context, seed, depth)``'s prompt, checked against the model's positions."""
    p = passkey_prompt(tokenizer, context, depth, passkey_key(seed, context, depth))
    max_positions = model.config.max_position_embeddings
    if p.input_ids.shape[1] > max_positions:
        raise ValueError(f"contexts: {context} tokens plus the question make {p.input_ids.shape[1]} positions, more "
                         f"than the model's {max_positions}")
    return p


def timed_sweep(model: Any, tokenizer: Any, context: int, seed: int, depth: float,
                configs: Sequence[kl.EvalConfig]) -> tuple[PasskeyPrompt, list[kl.EvalResult], float]:
    """One sample's prompt, its ``kl.sweep`` over ``configs`` and the sweep's seconds."""
    p = sample_prompt(model, tokenizer, context, seed, depth)
    t0 = time.perf_counter()
    results = kl.sweep(model, p.input_ids, p.context_len, configs)
    return p, results, time.perf_counter() - t0


def run_samples(model: Any, tokenizer: Any, sample_list: Sequence[tuple[int, int, float]],
                configs: Sequence[kl.EvalConfig], keep: tuple[int, int, float] | None = None) -> tuple[Any, dict, Any]:
    """``timed_sweep`` every sample; one row per (sample, configuration) with the key's verdict
    (``correct``), digit accuracy and summed NLL (a pandas DataFrame). Also the seconds per sample
    and, for the sample ``keep`` (if it is in the list), its ``(prompt, results, seconds)``."""
    import pandas as pd
    from tqdm import tqdm

    rows, seconds, kept = [], {}, None
    for ctx, seed, depth in tqdm(sample_list, desc="passkey samples", mininterval=10):
        p, results, seconds[(ctx, seed, depth)] = timed_sweep(model, tokenizer, ctx, seed, depth, configs)
        if (ctx, seed, depth) == keep:
            kept = (p, results, seconds[(ctx, seed, depth)])
        for r in results:
            m = span_metrics(r, p.key_start)
            rows.append({"context": ctx, "seed": seed, "depth": depth, "key": p.key, "policy": r.config.policy,
                         "keep_ratio": r.config.keep_ratio, "n_kept": r.n_kept, "correct": m["correct"],
                         "digit_acc": m["token_acc"], "key_nll": m["nll"]})
    return pd.DataFrame(rows), seconds, kept


def samples_per_context(df: Any) -> dict[int, int]:
    """Samples (depths x seeds) per context, counted on the first policy's keep_ratio 1.0 rows."""
    first = df[(df.policy == df.policy.iloc[0]) & (df.keep_ratio == 1.0)]
    return {int(c): int(n) for c, n in first.groupby("context").size().items()}


def accuracy_table(df: Any, by: Sequence[str] = ("context", "policy", "keep_ratio")) -> Any:
    """Per ``by`` group (default: context, policy, keep_ratio): accuracy over the samples with its
    Wilson 95 % interval (``lo``, ``hi``), the sample count ``n`` and the mean digit accuracy (a
    pandas DataFrame)."""
    import pandas as pd

    def wilson_row(group: Any) -> Any:
        k, n = int(group.correct.sum()), len(group)
        lo, hi = intervals.wilson_interval(k, n)
        return pd.Series({"accuracy": k / n, "lo": lo, "hi": hi, "n": n, "digit_acc": group.digit_acc.mean()})

    return (df.groupby(list(by), sort=False)
            .apply(wilson_row, include_groups=False).reset_index())


def _acc_row(acc: Any, ctx: int, policy: str, keep_ratio: float) -> Any:
    return acc[(acc.context == ctx) & (acc.policy == policy) & (acc.keep_ratio == keep_ratio)].iloc[0]


def lowest_ratio_matching_full(acc: Any, ctx: int, policy: str) -> float:
    """Smallest keep_ratio down to which ``policy``'s accuracy at context ``ctx`` stays at the
    uncompressed accuracy or better, at that keep_ratio and every larger one (1.0 when the largest
    compressed keep_ratio already falls short). Accuracy is higher-is-better and may be 0 without
    compression, so ``quality.keep_ratio_thresholds`` (a ratio to the full cache) does not apply."""
    sub = acc[(acc.context == ctx) & (acc.policy == policy)]
    full = float(_acc_row(acc, ctx, policy, 1.0).accuracy)
    lowest = 1.0
    for r in sorted(sub.keep_ratio, reverse=True):
        if _acc_row(acc, ctx, policy, r).accuracy < full - 1e-9:
            break
        lowest = r
    return lowest


CLAIM_MARGIN = 0.1   # "survives": accuracy within 10 points of the uncompressed accuracy
RELIABLE = 0.8       # uncompressed retrieval counts as reliable from this accuracy on


def reliable(uncompressed: float) -> bool:
    """Whether uncompressed retrieval is reliable (accuracy >= ``RELIABLE``): only then is there a
    retrieval for compression to keep or lose."""
    return uncompressed >= RELIABLE


def claim_verdict(lo: float, hi: float, uncompressed: float, margin: float = CLAIM_MARGIN) -> str:
    """The passkey claim's rule for one cell, from its Wilson interval ``lo``–``hi``: the claim is
    that accuracy stays within ``margin`` of the uncompressed accuracy; "holds" when the whole
    interval lies at or above that line, "fails" when it lies below, otherwise "not resolved" at
    this n. Below ``RELIABLE`` uncompressed accuracy there is no retrieval to survive compression:
    "not resolved"."""
    if not reliable(uncompressed):
        return "not resolved"
    line = uncompressed - margin
    return "fails" if hi < line else "holds" if lo >= line else "not resolved"


def claim_summary(df: Any, acc: Any, contexts: Sequence[int], policies: Sequence[str],
                  keep_ratios: Sequence[float]) -> dict[str, Any]:
    """How far uncompressed retrieval holds (>= ``RELIABLE``), and the paper's claim that keys survive
    90 % compression: per context, knorm at the smallest keep_ratio against the uncompressed
    accuracy (``claim_verdict``), its lowest keep_ratio matching it, and the best policy there. The
    verdict is "untestable" when no context is retrieved reliably uncompressed or keep_ratio 0.1
    was not run."""
    r_min = min(keep_ratios)
    full_by_ctx = {int(c): float(_acc_row(acc, c, policies[0], 1.0).accuracy) for c in contexts}
    holds = [c for c, a in full_by_ctx.items() if reliable(a)]
    at_1 = df[df.keep_ratio == 1.0].groupby(["context", "seed", "depth"]).correct.nunique()
    claim = {}
    for ctx in contexts:
        has_knorm = "knorm" in policies
        claim[int(ctx)] = {"uncompressed": full_by_ctx[ctx],
                           f"knorm_at_{r_min}": float(_acc_row(acc, ctx, "knorm", r_min).accuracy) if has_knorm else None,
                           "knorm_lowest_ratio_matching_full": lowest_ratio_matching_full(acc, ctx, "knorm") if has_knorm else None,
                           "best_policy_at_min": max(policies, key=lambda p: _acc_row(acc, ctx, p, r_min).accuracy),
                           "accuracy_at_min": {p: float(_acc_row(acc, ctx, p, r_min).accuracy) for p in policies}}
    testable = [c for c in contexts if reliable(full_by_ctx[c])]
    if "knorm" in policies and testable and r_min <= 0.1 + 1e-9:
        rows = {c: _acc_row(acc, c, "knorm", r_min) for c in testable}
        per_ctx = {c: claim_verdict(k.lo, k.hi, full_by_ctx[c]) for c, k in rows.items()}
        for c, v in per_ctx.items():
            claim[c]["verdict"] = v
        kinds = set(per_ctx.values())
        verdict = ("does not hold" if kinds == {"fails"} else "holds" if kinds == {"holds"} else
                   "holds only partly" if kinds == {"holds", "fails"} else "not resolved")
        text = (f"The paper's claim (keys survive 90 % compression) **{verdict}** on this model (question-agnostic; "
                f"per context: holds when knorm's Wilson 95 % interval lies at or above the uncompressed accuracy minus "
                f"{100 * CLAIM_MARGIN:.0f} points, fails when it lies below): at keep_ratio {r_min}, knorm retrieves "
                + ", ".join(f"{rows[c].accuracy:.0%} [{rows[c].lo:.0%}–{rows[c].hi:.0%}, n = {int(rows[c].n)}] at {c} "
                            f"tokens (uncompressed {full_by_ctx[c]:.0%}: {per_ctx[c]})" for c in testable)
                + ". The lowest keep_ratio down to which knorm keeps the uncompressed accuracy: " + ", ".join(
                    f"{claim[c]['knorm_lowest_ratio_matching_full']} at {c} tokens" for c in testable) + ".")
    else:
        verdict, text = "untestable", ("The paper's 90 % claim cannot be tested here: no context is retrieved "
                                       f"reliably (≥ {RELIABLE:.0%}) without compression, or keep_ratio 0.1 is not in this run.")
    return {"uncompressed_accuracy_by_context": full_by_ctx, "longest_context_retrieved_uncompressed": max(holds) if holds else None,
            "claim_90pct": {"verdict": verdict, "text": text, "by_context": claim},
            "policy_independent_at_keep_1": bool((at_1 == 1).all())}


def reprefill_speed(model: Any, prompt: PasskeyPrompt, sweep_results: Sequence[kl.EvalResult],
                    sweep_seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep (one prefill for every configuration) against prefill + compress + continuation
    for every *distinct* configuration of it (keep_ratio 1.0 once: the same cache for every
    policy), each through ``kl.evaluate``; the uncompressed run goes first and its continuation is
    the others' reference. Returns the timing summary and, per distinct configuration (compressed
    ones in sweep order, then 1.0), whether the verdict at every scored token and the NLL agree."""
    identity = next(r for r in sweep_results if r.config.keep_ratio == 1.0)
    distinct = [r for r in sweep_results if r.config.keep_ratio < 1.0] + [identity]
    ctx_ids, n = prompt.input_ids[:, :prompt.context_len], prompt.context_len
    new_ids, targets = prompt.input_ids[:, n:-1], prompt.input_ids[0, n + 1:]
    redone, reference = {}, None
    t0 = time.perf_counter()
    for r in [identity] + distinct[:-1]:
        pre = kl.prefill(model, ctx_ids, capture_hidden=kl.needs_layer_inputs(r.config.policy))
        if reference is None:
            reference = kl.continuation_logits(model, pre.cache, new_ids, r.config.position_mode)
        redone[id(r)] = kl.evaluate(model, pre, new_ids, targets, r.config, reference)[0]
    reprefill_seconds = time.perf_counter() - t0
    checks = [{"policy": r.config.policy, "keep_ratio": r.config.keep_ratio,
               "same_correct": bool(torch.equal(redone[id(r)].correct, r.correct)),
               "max_abs_nll_diff": float((redone[id(r)].nll - r.nll).abs().max())} for r in distinct]
    n_cont = new_ids.shape[1]
    sweep_tokens = n + n_cont * (1 + sum(r.config.keep_ratio < 1.0 for r in sweep_results))
    reprefill_tokens = len(distinct) * (n + n_cont)
    max_diff = max(c["max_abs_nll_diff"] for c in checks)
    same = all(c["same_correct"] for c in checks)
    return {"context": n, "continuation_tokens": n_cont, "n_configs_sweep": len(sweep_results),
            "n_configs_reprefill": len(distinct), "sweep_seconds": sweep_seconds, "reprefill_seconds": reprefill_seconds,
            "ratio": reprefill_seconds / sweep_seconds, "sweep_forward_tokens": sweep_tokens,
            "reprefill_forward_tokens": reprefill_tokens, "token_ceiling": reprefill_tokens / sweep_tokens,
            "metrics_identical": same and max_diff <= 1e-5, "max_abs_nll_diff": max_diff,
            "same_correct_everywhere": same}, checks


# ---- the paper's claim under its own protocol and under kvpress's ----
# question-agnostic (kvpress's pipeline, the sweep above): the cache of the context alone is
# compressed; the question, the answer prefix and the key are read over it. reference (the
# paper's code, l2compress ``eval_passkey.py`` with ``gen_utils.generate_with_context``): the
# question and the answer prefix are in the prefill, the first answer token comes from the
# uncompressed logits, then the whole cache is compressed once and decoding continues greedily.
PROTOCOLS: tuple[str, ...] = ("question-agnostic", "reference")


def protocol_samples(sizes: dict[str, Any]) -> list[tuple[int, int, float]]:
    """``protocol_seeds`` keys at every depth of ``depths``, all at ``protocol_context`` tokens."""
    return [(sizes["protocol_context"], seed, float(depth)) for seed in range(sizes["protocol_seeds"])
            for depth in sizes["depths"]]


def protocol_configs(policies: Sequence[str], keep_ratios: Sequence[float],
                     skip_sets: Sequence[Sequence[int]]) -> list[kl.EvalConfig]:
    """keep_ratio 1.0 once (nothing is evicted, whatever the skip set), then every (skip set,
    policy, keep_ratio below 1)."""
    return [kl.EvalConfig(1.0, policies[0], tuple(skip_sets[0]))] + [
        kl.EvalConfig(r, pol, tuple(skip)) for skip in skip_sets for pol in policies for r in keep_ratios if r < 1]


def skip_label(skip_layers: Sequence[int]) -> str:
    return "skip (" + ", ".join(str(i) for i in skip_layers) + ")"


def protocol_rows(model: Any, tokenizer: Any, sample_list: Sequence[tuple[int, int, float]],
                  configs: Sequence[kl.EvalConfig]) -> tuple[Any, float]:
    """Every sample under both ``PROTOCOLS``, one row per (sample, protocol, configuration) with
    the key's verdict: the argmax is right at every key token (so greedy decoding reproduces the
    key). Under "reference" the first key token is judged on the uncompressed prefill's logits and
    the rest teacher-forced over the compressed cache of everything before the key. Also the seconds."""
    import pandas as pd
    from tqdm import tqdm

    rows, t0 = [], time.perf_counter()
    for ctx, seed, depth in tqdm(sample_list, desc="passkey protocols", mininterval=10):
        p = sample_prompt(model, tokenizer, ctx, seed, depth)
        pre = kl.prefill(model, p.input_ids[:, :p.key_start],
                         capture_hidden=any(kl.needs_layer_inputs(c.policy) for c in configs))
        first_ok = int(pre.last_logits.argmax(-1)) == int(p.input_ids[0, p.key_start])
        runs = {"question-agnostic": (kl.sweep(model, p.input_ids, p.context_len, configs), p.key_start, None),
                "reference": (kl.sweep(model, p.input_ids, p.key_start, configs, pre=pre), p.key_start + 1, first_ok)}
        for protocol, (results, start, first) in runs.items():
            for r in results:
                m = span_metrics(r, start)
                n_key = m["n_tokens"] + (first is not None)
                rows.append({"protocol": protocol, "context": ctx, "seed": seed, "depth": depth,
                             "policy": r.config.policy, "keep_ratio": r.config.keep_ratio,
                             "skip": skip_label(r.config.skip_layers),
                             "correct": m["correct"] and first is not False,
                             "digit_acc": (m["token_acc"] * m["n_tokens"] + bool(first)) / n_key})
    return pd.DataFrame(rows), time.perf_counter() - t0


def protocol_claims(acc: Any, claim_keep_ratio: float = 0.1, margin: float = CLAIM_MARGIN) -> list[dict[str, Any]]:
    """The paper's passkey claim (knorm keeps retrieval at 90 % compression) per protocol and skip
    set, from ``accuracy_table(rows, by=("protocol", "skip", "policy", "keep_ratio"))``: knorm at
    ``claim_keep_ratio`` against the same protocol's uncompressed accuracy, by ``claim_verdict``."""
    out = []
    for (protocol, skip), sub in acc[acc.policy == "knorm"].groupby(["protocol", "skip"], sort=False):
        at = sub[sub.keep_ratio == claim_keep_ratio]
        if at.empty:
            continue
        full = float(acc[(acc.protocol == protocol) & (acc.keep_ratio == 1.0)].accuracy.iloc[0])
        k = at.iloc[0]
        verdict = claim_verdict(k.lo, k.hi, full, margin)
        out.append({"protocol": protocol, "skip": skip, "keep_ratio": claim_keep_ratio, "uncompressed": full,
                    "accuracy": float(k.accuracy), "lo": float(k.lo), "hi": float(k.hi), "n": int(k.n),
                    "margin": margin, "verdict": verdict})
    return out


def protocols_text(record: dict[str, Any]) -> str:
    """What the two protocols say about the paper's passkey claim (Markdown), from 05's record."""
    r = record["results"]
    if not r.get("protocol_claims"):
        return ""
    sizes = record["parameters"]["sizes"]
    claims = "; ".join(f"{c['protocol']}, {c['skip']}: {c['accuracy']:.0%} (Wilson 95 % {c['lo']:.0%}–{c['hi']:.0%}, "
                       f"n = {c['n']}; uncompressed {c['uncompressed']:.0%}) — **{c['verdict']}**"
                       + (" (uncompressed retrieval is not reliable here: nothing to survive compression)"
                          if not reliable(c["uncompressed"]) else "")
                       for c in r["protocol_claims"])
    return (f"**The claim under both protocols** ({sizes['protocol_context']}-token contexts, "
            f"{r['protocol_n_samples']} samples: {sizes['protocol_seeds']} keys × {len(sizes['depths'])} depths). "
            f"knorm at keep_ratio {r['protocol_claims'][0]['keep_ratio']}: {claims}. The question-agnostic protocol "
            "tests what kvpress users get (the cache is compressed before the question is known); the reference "
            "protocol is the paper's (question in the prefill, first answer token uncompressed), so only it "
            "tests the paper's number. Verdict rule: holds when the interval lies at or above the uncompressed "
            f"accuracy minus {100 * r['protocol_claims'][0]['margin']:.0f} points, fails when it lies below, "
            "otherwise not resolved at this n.")


def generation_runs(model: Any, docs: Sequence[kl.TokenizedDoc], policies: Sequence[str], keep_ratios: Sequence[float],
                    n_new: int, skip_layers: Sequence[int]) -> tuple[Any, dict, float]:
    """Greedy continuations of ``n_new`` tokens per prompt, from ONE prefill per prompt: the full
    cache's and every (policy, keep_ratio)'s. Returns the agreement rows (a pandas DataFrame), the
    generated tokens by ``(title, policy, keep_ratio)`` (the full cache as ``"full cache", 1.0``)
    and the seconds taken."""
    import pandas as pd
    from tqdm import tqdm

    rows, texts = [], {}
    t0 = time.perf_counter()
    for doc in tqdm(docs, desc="generation prompts", mininterval=10):
        pre = kl.prefill(model, doc.input_ids, capture_hidden=any(kl.needs_layer_inputs(p) for p in policies))
        reference = texts[(doc.title, "full cache", 1.0)] = decode.generate_greedy(model, doc.input_ids, n_new, pre=pre)
        for pol in policies:
            for r in keep_ratios:
                out = texts[(doc.title, pol, r)] = decode.generate_greedy(model, doc.input_ids, n_new, r, pol,
                                                                      tuple(skip_layers), pre=pre)
                rows.append({"prompt": doc.title, "policy": pol, "keep_ratio": r,
                             **quality.generation_agreement(out, reference)})
    return pd.DataFrame(rows), texts, time.perf_counter() - t0


def generation_aggregate(gdf: Any) -> Any:
    """Mean matching prefix and token agreement per (policy, keep_ratio) over the prompts."""
    return (gdf.groupby(["policy", "keep_ratio"], sort=False)[["matching_prefix", "token_agreement"]]
            .mean().reset_index())


def generation_examples(tokenizer: Any, docs: Sequence[kl.TokenizedDoc], texts: dict, policies: Sequence[str],
                        keep_ratios: Sequence[float]) -> tuple[list[dict[str, str]], str]:
    """The first two prompts' continuations (full cache; knorm and random, else the first two
    policies, at the smallest keep_ratio) as records and as an HTML table in which text after
    ``‖`` differs from the full cache's continuation."""
    import html

    r_show = min(keep_ratios)
    show = [pol for pol in ("knorm", "random") if pol in policies] or list(policies[:2])

    def marked(ids: torch.Tensor, ref: torch.Tensor) -> str:
        n = quality.generation_agreement(ids, ref)["matching_prefix"]
        same, rest = tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])
        return html.escape(same) + ("<b style='color:#b00'>‖</b>" + html.escape(rest) if rest else "")

    td = "<td style='vertical-align:top'>"
    cells = []
    for doc in docs[:2]:
        ref = texts[(doc.title, "full cache", 1.0)]
        tail = html.escape(tokenizer.decode(doc.input_ids[0, -40:]))
        cells.append(f"<tr>{td}<i>{html.escape(doc.title)}</i><br>…{tail}</td>{td}{html.escape(tokenizer.decode(ref))}</td>"
                     + "".join(f"{td}{marked(texts[(doc.title, pol, r_show)], ref)}</td>" for pol in show) + "</tr>")
    table = ("<table><tr><th>prompt (end)</th><th>full cache</th>"
             + "".join(f"<th>{pol}, keep_ratio {r_show}</th>" for pol in show) + "</tr>" + "".join(cells) + "</table>")
    records = [{"prompt": doc.title, "full_cache": tokenizer.decode(texts[(doc.title, "full cache", 1.0)]),
                **{f"{pol}@{r_show}": tokenizer.decode(texts[(doc.title, pol, r_show)]) for pol in show}}
               for doc in docs[:2]]
    return records, table


def findings(record: dict[str, Any]) -> str:
    """What the numbers say (Markdown), from a recorded result of 05_passkey_retrieval (the whole
    JSON record: parameters and results): how far uncompressed retrieval holds, the paper's 90 %
    claim, the best policy at the smallest keep_ratio, the sweep's speed, generation agreement.
    The notebook's final cell and REPORT.md's section both show this text."""
    p, r = record["parameters"], record["results"]
    s, sp, sizes = r["summary"], r["speed"], p["sizes"]
    full = {int(c): a for c, a in s["uncompressed_accuracy_by_context"].items()}
    longest = s["longest_context_retrieved_uncompressed"]
    testable = [c for c, a in full.items() if reliable(a)]
    r_min = min(p["keep_ratios"])

    def best_at(ctx: int) -> str:
        """The highest accuracy at ``r_min`` with its Wilson interval, and whether the interval
        separates it from the runner-up's."""
        rows = sorted((x for x in r["accuracy"] if x["context"] == ctx and x["keep_ratio"] == r_min),
                      key=lambda x: -x["accuracy"])
        top, rest = rows[0], rows[1:]
        tied = [x["policy"] for x in rest if x["accuracy"] == top["accuracy"]]
        sep = ("" if not rest else f"; tied with {', '.join(tied)}" if tied else
               f"; above {rest[0]['policy']}'s {rest[0]['accuracy']:.0%}, "
               + ("separated by the intervals" if top["lo"] > rest[0]["hi"] else "not separated by the intervals"))
        return (f"{top['policy']}'s at {ctx} tokens ({top['accuracy']:.0%}, Wilson 95 % {top['lo']:.0%}–{top['hi']:.0%}, "
                f"n = {int(top['n'])}{sep})")

    best = "; ".join(best_at(c) for c in testable) or "n/a (no context is retrieved reliably uncompressed)"
    gen = r["generation_aggregate"]
    g = {(x["policy"], x["keep_ratio"]): x for x in gen}
    r_show = min(sizes["gen_keep_ratios"])
    best_gen = max(gen, key=lambda x: x["token_agreement"])
    n_prompts = len({x["prompt"] for x in r["generation"]})
    gen_text = ", ".join(f"{pol} {g[(pol, r_show)]['matching_prefix']:.1f} tokens "
                         f"(agreement {g[(pol, r_show)]['token_agreement']:.0%})" for pol in p["policies"])
    return f"""**How far uncompressed retrieval holds.** Without compression the model retrieves the key in
{", ".join(f"{a:.0%} of samples at {c} tokens" for c, a in full.items())};
{f"it holds (≥ {RELIABLE:.0%}) up to {longest} tokens" if longest else f"it holds (≥ {RELIABLE:.0%}) at none of these contexts"}.

{s['claim_90pct']['text']}

At keep_ratio {r_min}, the highest accuracy is {best}. Accuracy at keep_ratio 1.0 is the same for every policy in
every sample: {s['policy_independent_at_keep_1']}.

**Sweep speed.** Context {sp['context']} tokens, {sp['continuation_tokens']} continuation tokens,
{sp['n_configs_sweep']} configurations ({sp['n_configs_reprefill']} distinct). One prefill for all of them:
**{sp['sweep_seconds']:.1f} s**; re-prefilling each distinct configuration: **{sp['reprefill_seconds']:.1f} s**,
**{sp['ratio']:.1f}×** faster (the bar, ≥ 6×, is {"met" if sp['ratio'] >= 6 else "not met"} at this context). Forward tokens:
{sp['reprefill_forward_tokens']:,} re-prefilled against {sp['sweep_forward_tokens']:,} in the sweep, a ceiling of
{sp['token_ceiling']:.1f}× if time were proportional to tokens (the sweep also pays per configuration for scoring, copying
the cache and attending over it). Metrics identical: {sp['metrics_identical']} (same verdict at every scored token:
{sp['same_correct_everywhere']}; largest NLL difference {sp['max_abs_nll_diff']:.1e}).

{protocols_text(record)}

**Generation.** At keep_ratio {r_show}, greedy continuations agree with the full cache's for {gen_text} out of
{sizes['gen_new_tokens']} (mean over {n_prompts} prompts). The highest mean agreement: {best_gen['policy']} at
keep_ratio {best_gen['keep_ratio']} ({best_gen['token_agreement']:.0%} of tokens; {n_prompts} prompts give no interval, so this ranks
nothing).
"""
