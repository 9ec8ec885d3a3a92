"""Probes of knorm_study/passkey.py (see knorm_study/fingerprint.py).

05_passkey_retrieval's steps at tiny sizes: the keys and prompts (the embedded tokenizer's exact
ids, chat template and plain text), the sample grids, ``run_samples`` with ``span_metrics``,
``samples_per_context``, ``accuracy_table``, ``claim_summary`` and the non-timing numbers of
``reprefill_speed``; ``protocol_rows`` under both protocols with ``protocol_claims``; the
generation runs (through knorm_study.decode) with their aggregate and examples; and the claim's
rules and ``findings`` on synthetic accuracy tables built to reach every verdict.

The sweeps run on ``tiny_llama``'s 256-token vocabulary through ``SmallVocab``: the embedded
tokenizer with the ids the passkey prompts use renumbered into 0..255, the ten digits sharing one
id, which the model favours: a key comes out right at some digits, wrong at others, whole in
some samples and configurations and not in others."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import torch

import knorm_lib as kl
from knorm_study.fingerprint import probe
from knorm_study.probes._models import ids, tiny_llama, tiny_llama_favouring, tokenizer

FIVE = [0.0, 0.25, 0.5, 0.75, 1.0]
CONTEXTS = (110, 128)   # the shortest context the embedded tokenizer's template allows is 102


def _plain(obj: Any) -> Any:
    from knorm_study import fingerprint

    return fingerprint._plain(obj.to_dict("records") if hasattr(obj, "to_dict") else obj)


def _table(df: Any) -> dict:
    """A DataFrame in few numbers: its column names, and per column numbers as [count, missing,
    sum, sum weighted by row number], anything else as [value, run length] runs."""
    from knorm_study.probes.quality import _column

    return {"columns": list(df.columns), **{c: _column(df[c].tolist()) for c in df.columns}}


class SmallVocab:
    """The embedded tokenizer with the ids of the passkey prompts' pieces renumbered 0..n-1 (in
    id order), so a model with a 256-token vocabulary reads them; ``decode`` maps back. With
    ``digit_classes`` the ten digits share that many ids (digit % classes; ``decode`` gives the
    smallest digit of each): a model favouring those ids then gets a key right at about one digit
    in ``digit_classes`` (not one in ten), and whole keys. ``chat=False``: a
    tokenizer without a chat template (the plain-text prompt)."""

    def __init__(self, tok: Any, chat: bool = True, digit_classes: int = 10) -> None:
        from knorm_study import passkey

        self.tok, self.chat_template = tok, tok.chat_template if chat else None
        marker = "\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker + passkey.PASSKEY_QUESTION}],
                                       tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        pieces = [head + passkey.PASSKEY_INTRO, passkey.PASSKEY_INTRO, passkey.PASSKEY_FILLER, ".",
                  tail + passkey.PASSKEY_ANSWER_PREFIX, passkey.PASSKEY_QUESTION + "\n" + passkey.PASSKEY_ANSWER_PREFIX]
        pieces += [f" The pass key is {d * 5}. Remember it. {d * 5} is the pass key." for d in "0123456789"]
        pieces += [" " + d * 5 for d in "0123456789"]
        digit_ids = tok.convert_tokens_to_ids(list("0123456789"))
        real = sorted({i for p in pieces for i in self._real(p)} - set(digit_ids))
        self.to_small = {r: s for s, r in enumerate(real)}
        self.to_small.update({r: len(real) + d % digit_classes for d, r in enumerate(digit_ids)})
        self.to_real = torch.tensor(real + digit_ids[:digit_classes])
        assert len(self.to_real) <= 256, len(self.to_real)
        self.digit_ids = tuple(range(len(real), len(real) + digit_classes))

    def _real(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tok.apply_chat_template(*args, **kwargs)

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None) -> dict:
        small = [self.to_small[i] for i in self._real(text)]
        return {"input_ids": torch.tensor([small]) if return_tensors == "pt" else small}

    def decode(self, small: Any) -> str:
        return self.tok.decode(self.to_real[torch.as_tensor(small)].tolist())


@functools.cache
def _small_vocab() -> SmallVocab:
    return SmallVocab(tokenizer(), digit_classes=1)


def _model_and_tokenizer() -> tuple[Any, SmallVocab]:
    tok = _small_vocab()
    return tiny_llama_favouring(tok.digit_ids, seed=1, others=0.2), tok


def _prompt_numbers(p: Any, full: bool = True) -> dict:
    from knorm_study.probes.quality import _column

    return {"input_ids": p.input_ids[0].tolist() if full else _column(p.input_ids[0].tolist()),
            "context_len": p.context_len, "key_start": p.key_start,
            "key": p.key, "depth": p.depth, "key_position": p.key_position, "n_prompt": p.prompt_ids.shape[1],
            "key_ids": p.key_ids.tolist()}


@probe("passkey")
def keys_prompts_and_grids() -> dict:
    """``passkey_key`` (default and other digit counts), ``passkey_prompt`` with the embedded
    tokenizer at every depth of 05 (chat template) and without a chat template, the sample grids
    (``samples``: depths up to 2048 tokens, long_depths above; ``protocol_samples``,
    ``protocol_configs``, ``skip_label``) and the module's constants."""
    from knorm_study import passkey

    tok = tokenizer()
    keys = {f"{s}/{c}/{d}": passkey.passkey_key(s, c, d) for s in range(2) for c in (256, 1024, 4096) for d in FIVE}
    keys.update({"3 digits": passkey.passkey_key(0, 256, 0.5, digits=3), "8 digits": passkey.passkey_key(3, 8160, 1.0, 8),
                 "int depth": passkey.passkey_key(0, 1024, 1)})
    prompts = {f"{c}@{d}": _prompt_numbers(passkey.passkey_prompt(tok, c, d, passkey.passkey_key(0, c, d)),
                                           full=(c, d) == (CONTEXTS[1], 0.5))
               for c in CONTEXTS for d in FIVE}
    plain = SmallVocab(tok, chat=False)
    p = passkey.passkey_prompt(plain, 90, 0.5, "31415")
    prompts["plain text"] = {**_prompt_numbers(p), "text": plain.decode(p.input_ids[0])}
    sizes = {"contexts": [1024, 2048, 4096, 8160], "seeds": [2, 1, 1, 1], "depths": FIVE, "long_depths": [0.0, 0.5, 1.0],
             "protocol_context": 1024, "protocol_seeds": 3}
    configs = passkey.protocol_configs(["knorm", "random"], [1.0, 0.5, 0.25, 0.1], [[0, 1], [0, 1, 12]])
    return {"keys": keys, "prompts": prompts, "samples": passkey.samples(sizes),
            "protocol_samples": passkey.protocol_samples(sizes),
            "protocol_configs": [[c.keep_ratio, c.policy, list(c.skip_layers)] for c in configs],
            "skip_labels": [passkey.skip_label(s) for s in ([0], [0, 1, 12], [])],
            "constants": [passkey.PASSKEY_INTRO, passkey.PASSKEY_FILLER, passkey.PASSKEY_QUESTION,
                          passkey.PASSKEY_ANSWER_PREFIX, passkey.CLAIM_MARGIN, passkey.RELIABLE, list(passkey.PROTOCOLS)]}


@probe("passkey")
def sample_sweeps() -> dict:
    """``run_samples`` (``timed_sweep``, ``sample_prompt``, ``span_metrics``) over three samples of
    two contexts, knorm / random / snapkv at three keep_ratios; ``samples_per_context``,
    ``accuracy_table``, ``claim_summary`` on them, ``span_metrics`` on other spans, and the
    non-timing numbers of ``reprefill_speed`` on the kept sample."""
    from knorm_study import passkey

    model, tok = _model_and_tokenizer()
    sample_list = [(CONTEXTS[0], 0, 0.0), (CONTEXTS[0], 0, 1.0), (CONTEXTS[1], 1, 0.5)]
    configs = [kl.EvalConfig(r, p, (0, 1)) for p in ("knorm", "random", "snapkv") for r in (1.0, 0.5, 0.1)]
    df, seconds, kept = passkey.run_samples(model, tok, sample_list, configs, keep=sample_list[-1])
    acc = passkey.accuracy_table(df)
    p, results, _ = kept
    spans = [passkey.span_metrics(r, p.key_start, p.key_start + 2) for r in results[:3]]
    spans += [passkey.span_metrics(results[4], p.context_len + 1), passkey.span_metrics(results[4], p.key_start - 3)]
    speed, checks = passkey.reprefill_speed(model, p, results, 1.0)
    return {"rows": _table(df), "n_seconds": len(seconds), "sample_keys": sorted(map(list, seconds)),
            "kept": _prompt_numbers(p, full=False), "per_context": passkey.samples_per_context(df), "accuracy": _table(acc),
            "claim": _plain(passkey.claim_summary(df, acc, list(CONTEXTS), ["knorm", "random", "snapkv"], [1.0, 0.5, 0.1])),
            "spans": spans, "speed": {k: v for k, v in speed.items() if "seconds" not in k and k != "ratio"},
            "checks": checks}


@probe("passkey")
def protocol_rows_and_claims() -> dict:
    """``protocol_rows`` (both protocols: question-agnostic and reference, two skip sets) over
    three samples, ``accuracy_table`` by protocol and skip set, ``protocol_claims``."""
    from knorm_study import passkey

    model, tok = _model_and_tokenizer()
    sizes = {"protocol_context": CONTEXTS[1], "protocol_seeds": 1, "depths": [0.0, 0.5, 1.0]}
    configs = passkey.protocol_configs(["knorm", "random"], [1.0, 0.5, 0.1], [[0, 1], [0, 1, 2]])
    rows, _ = passkey.protocol_rows(model, tok, passkey.protocol_samples(sizes), configs)
    acc = passkey.accuracy_table(rows, by=("protocol", "skip", "policy", "keep_ratio"))
    return {"rows": _table(rows), "accuracy": _table(acc), "claims": _plain(passkey.protocol_claims(acc, 0.1)),
            "claims_0.5": _plain(passkey.protocol_claims(acc, 0.5, margin=0.3))}


@probe("passkey")
def generation() -> dict:
    """``generation_runs`` (one prefill per prompt; snapkv among the policies), its aggregate, and
    ``generation_examples`` (knorm and random shown; without them, the first two policies)."""
    from knorm_study import passkey

    model, tok = tiny_llama(), tokenizer()
    docs = [kl.TokenizedDoc("Alpha", ids(70, seed=61)), kl.TokenizedDoc("Beta", ids(70, seed=62))]
    policies = ["knorm", "streaming", "snapkv", "random"]
    gdf, texts, _ = passkey.generation_runs(model, docs, policies, [0.5, 0.1], 8, [0, 1])
    records, html = passkey.generation_examples(tok, docs, texts, policies, [0.5, 0.1])
    other, other_html = passkey.generation_examples(tok, docs, texts, ["streaming", "snapkv"], [0.1])
    return {"rows": _plain(gdf), "texts": {"|".join(map(str, k)): v.tolist() for k, v in texts.items()},
            "aggregate": _plain(passkey.generation_aggregate(gdf)), "examples": records, "html": html,
            "other_examples": other, "other_html": other_html}


# ---- synthetic accuracy tables: the claim's rules and the prose on every branch ----

# correct samples out of N_SYNTH per (context, policy, keep_ratio); 1024: holds, 2048: fails,
# 4096: unreliable uncompressed, 8160: not resolved; keep_ratio 1.0 is the same for every policy
N_SYNTH = 40
CORRECT = {1024: {"knorm": [40, 40, 39, 40], "random": [40, 30, 20, 10], "streaming": [40, 40, 39, 40]},
           2048: {"knorm": [36, 30, 20, 10], "random": [36, 20, 10, 5], "streaming": [36, 36, 30, 20]},
           4096: {"knorm": [20, 20, 10, 5], "random": [20, 10, 5, 2], "streaming": [20, 20, 20, 2]},
           8160: {"knorm": [32, 32, 30, 30], "random": [32, 10, 5, 0], "streaming": [32, 20, 10, 1]}}
RATIOS = [1.0, 0.5, 0.25, 0.1]


@functools.cache
def _synthetic_json() -> str:
    """Sample rows with the ``CORRECT`` counts (which samples are right: seeded), as JSON."""
    from knorm_study import passkey

    rng = random.Random(71)
    rows = []
    for ctx, by_policy in CORRECT.items():
        order = {}
        for policy, counts in by_policy.items():
            for r, k in zip(RATIOS, counts):
                if r == 1.0:   # the same samples right for every policy at keep_ratio 1.0
                    right = order.setdefault(ctx, set(rng.sample(range(N_SYNTH), k)))
                else:
                    right = set(rng.sample(range(N_SYNTH), k))
                for i in range(N_SYNTH):
                    seed, depth = divmod(i, 5)
                    ok = i in right
                    rows.append({"context": ctx, "seed": seed, "depth": FIVE[depth],
                                 "key": passkey.passkey_key(seed, ctx, FIVE[depth]), "policy": policy, "keep_ratio": r,
                                 "n_kept": kl.n_kept_for(ctx, r), "correct": ok,
                                 "digit_acc": 1.0 if ok else round(rng.random() * 4) / 5,
                                 "key_nll": rng.random() * (1 - ok)})
    return json.dumps(rows)


def _synthetic_df() -> Any:
    import pandas as pd

    return pd.DataFrame(json.loads(_synthetic_json()))


@probe("passkey")
def claim_rules() -> dict:
    """``claim_verdict`` and ``reliable`` at and around their lines, ``lowest_ratio_matching_full``
    (a drop, then a recovery that does not count), and ``claim_summary`` on synthetic samples for
    every verdict: holds, does not hold, holds only partly, not resolved, untestable (no reliable
    context, keep_ratio 0.1 not run, knorm not run), and keep_ratio 1.0 differing by policy."""
    from knorm_study import passkey

    df = _synthetic_df()
    acc = passkey.accuracy_table(df)
    policies = ["knorm", "random", "streaming"]
    verdicts = {f"{lo}/{hi}/{u}": passkey.claim_verdict(lo, hi, u)
                for lo, hi, u in [(0.9, 1.0, 1.0), (0.8999, 1.0, 1.0), (0.5, 0.8999, 1.0), (0.5, 0.9, 1.0),
                                  (0.7, 0.85, 0.8), (0.69, 0.85, 0.8), (0.1, 0.2, 0.7999), (0.95, 1.0, 0.79)]}
    verdicts["margin 0.2"] = passkey.claim_verdict(0.75, 0.9, 0.95, margin=0.2)
    lowest = {f"{c}/{p}": passkey.lowest_ratio_matching_full(acc, c, p) for c in CORRECT for p in policies}
    summaries = {}
    for name, contexts, pols, ratios in [("all", [1024, 2048, 4096, 8160], policies, RATIOS),
                                         ("holds", [1024], policies, RATIOS), ("partly", [1024, 2048], policies, RATIOS),
                                         ("fails", [2048, 4096], policies, RATIOS),
                                         ("unreliable", [4096], policies, RATIOS),
                                         ("no 0.1", [1024, 2048], policies, RATIOS[:3]),
                                         ("no knorm", [1024, 2048], ["random", "streaming"], RATIOS)]:
        summaries[name] = _plain(passkey.claim_summary(df, acc, contexts, pols, ratios))
    differing = df.copy()
    differing.loc[(differing.policy == "random") & (differing.keep_ratio == 1.0) & (differing.seed == 0), "correct"] ^= True
    summaries["differing at 1.0"] = _plain(passkey.claim_summary(differing, passkey.accuracy_table(differing), [1024],
                                                                policies, RATIOS))["policy_independent_at_keep_1"]
    return {"verdicts": verdicts, "reliable": [passkey.reliable(x) for x in (0.8, 0.7999, 1.0, 0.0)],
            "accuracy": _table(acc), "lowest": lowest, "summaries": summaries,
            "per_context": passkey.samples_per_context(df)}


def _protocol_acc() -> Any:
    """A protocol accuracy table (``accuracy_table`` by protocol, skip set, policy, keep_ratio):
    the question-agnostic protocol loses the key, the reference protocol keeps it."""
    import pandas as pd

    from knorm_study import passkey

    rng, rows = random.Random(73), []
    right = {("question-agnostic", 1.0): 38, ("question-agnostic", 0.5): 20, ("question-agnostic", 0.1): 4,
             ("reference", 1.0): 40, ("reference", 0.5): 40, ("reference", 0.1): 40}
    for protocol in passkey.PROTOCOLS:
        for skip in ([0, 1], [0, 1, 12]):
            for policy in ("knorm", "random"):
                for r in (1.0, 0.5, 0.1):
                    if r == 1.0 and (skip != [0, 1] or policy != "knorm"):
                        continue
                    k = max(0, right[protocol, r] - (3 if skip != [0, 1] else 0)
                            - (10 if policy == "random" and r < 1 else 0))
                    hits = set(rng.sample(range(N_SYNTH), k))
                    rows += [{"protocol": protocol, "context": 1024, "seed": i // 5, "depth": FIVE[i % 5], "policy": policy,
                              "keep_ratio": r, "skip": passkey.skip_label(skip), "correct": i in hits,
                              "digit_acc": 1.0 if i in hits else 0.4} for i in range(N_SYNTH)]
    return passkey.accuracy_table(pd.DataFrame(rows), by=("protocol", "skip", "policy", "keep_ratio"))


def _record(testable: bool) -> dict:
    """A synthetic 05 record: ``claim_summary`` of the synthetic samples, their accuracy table,
    protocol claims, speed and generation numbers."""
    from knorm_study import passkey

    df = _synthetic_df()
    contexts = [1024, 2048, 4096, 8160] if testable else [4096]
    df = df[df.context.isin(contexts)]
    policies = ["knorm", "random", "streaming"] if testable else ["random", "knorm"]
    df = df[df.policy.isin(policies)]
    acc = passkey.accuracy_table(df)
    claim = passkey.claim_summary(df, acc, contexts, policies, RATIOS)
    gen = [{"prompt": f"P{i}", "policy": pol, "keep_ratio": r, "matching_prefix": 3 + i + 10 * r + len(pol) % 3,
            "token_agreement": (3 + i + 10 * r + len(pol) % 3) / 16}
           for i in range(2) for pol in policies for r in (0.5, 0.25)]
    import pandas as pd

    gen_agg = passkey.generation_aggregate(pd.DataFrame(gen))
    claims = passkey.protocol_claims(_protocol_acc(), 0.1) if testable else []
    speed = {"context": 1024, "continuation_tokens": 30, "n_configs_sweep": 30, "n_configs_reprefill": 26,
             "sweep_seconds": 4.25, "reprefill_seconds": 31.5 if testable else 20.0,
             "ratio": 31.5 / 4.25 if testable else 20 / 4.25,
             "sweep_forward_tokens": 1924, "reprefill_forward_tokens": 27404, "token_ceiling": 27404 / 1924,
             "metrics_identical": testable, "max_abs_nll_diff": 3.1e-6, "same_correct_everywhere": True}
    record = {"parameters": {"keep_ratios": RATIOS, "policies": policies,
                             "sizes": {"gen_keep_ratios": [0.5, 0.25], "gen_new_tokens": 16, "protocol_context": 1024,
                                       "protocol_seeds": 8, "depths": FIVE}},
              "results": {"summary": {**claim, "n_samples": len(df),
                                      "samples_per_context": passkey.samples_per_context(df)},
                          "accuracy": acc.to_dict("records"), "speed": speed, "generation": gen,
                          "generation_aggregate": gen_agg.to_dict("records"), "protocol_claims": claims,
                          "protocol_n_samples": 40}}
    return _plain(record)


@probe("passkey")
def findings_text() -> dict:
    """``protocol_claims`` on a synthetic protocol table (holds, fails, other margins),
    ``protocols_text`` and ``findings`` of two synthetic 05 records: one with every claim verdict,
    protocol claims and a fast sweep; one with no reliable context, no protocol claims and a slow
    sweep."""
    from knorm_study import passkey

    acc = _protocol_acc()
    testable, untestable = _record(True), _record(False)
    return {"protocol_accuracy": _table(acc), "protocol_claims": _plain(passkey.protocol_claims(acc, 0.1)),
            "protocol_claims_0.5": _plain(passkey.protocol_claims(acc, 0.5, margin=0.05)),
            "protocol_claims_0.3": _plain(passkey.protocol_claims(acc, 0.3)),
            "protocols_text": passkey.protocols_text(testable), "no_protocols_text": passkey.protocols_text(untestable),
            "findings": passkey.findings(testable), "untestable_findings": passkey.findings(untestable)}
