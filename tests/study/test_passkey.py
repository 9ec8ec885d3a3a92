"""knorm_study.passkey: the samples and the answer span."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import knorm_lib as kl
from helpers import CONTEXT, N_TOKENS, _acc, random_ids
from knorm_study import decode, passkey


def test_span_metrics_reads_exactly_the_spans_tokens(tiny32):
    """span_metrics: input position p is scored token p - context_len - 1 of a sweep result, so a
    span's verdict is the argmax check at exactly those positions (the passkey's digits)."""
    ids = random_ids(N_TOKENS, seed=3)
    res = kl.sweep(tiny32, ids, CONTEXT, [kl.EvalConfig(1.0)])[0]
    logits = tiny32(ids).logits[0]
    start, end = CONTEXT + 5, CONTEXT + 9
    want = logits[start - 1:end - 1].argmax(-1) == ids[0, start:end]
    m = passkey.span_metrics(res, start, end)
    assert m["correct"] == bool(want.all()) and m["n_tokens"] == 4
    assert m["token_acc"] == pytest.approx(want.float().mean().item())
    nll = F.cross_entropy(logits[start - 1:end - 1].double(), ids[0, start:end], reduction="sum").item()
    assert m["nll"] == pytest.approx(nll, rel=1e-4)
    assert passkey.span_metrics(res, N_TOKENS - 3)["n_tokens"] == 3  # end=None: to the last token
    # force a span the model gets right: replace the targets by the model's own argmax
    forced = ids.clone()
    for p in range(CONTEXT + 1, N_TOKENS):
        forced[0, p] = tiny32(forced[:, :p]).logits[0, -1].argmax()
    assert passkey.span_metrics(kl.sweep(tiny32, forced, CONTEXT, [kl.EvalConfig(1.0)])[0], CONTEXT + 1)["correct"]
    for bad in (CONTEXT, N_TOKENS):  # not scored: predicted by the prefill, or past the end
        with pytest.raises(ValueError, match="start"):
            passkey.span_metrics(res, bad)
    with pytest.raises(ValueError, match="end"):
        passkey.span_metrics(res, start, start)


def test_passkey_prompt_layout(real_model):
    """passkey_prompt: the context is exactly context_tokens long and holds the key line at the
    requested depth; the question follows; input_ids[:, key_start:] are the key's digits; the key
    is a deterministic function of (seed, context, depth); bad arguments are refused by name."""
    _, tokenizer = real_model
    spots = []
    for depth in (0.0, 0.5, 1.0):
        key = passkey.passkey_key(0, 300, depth)
        assert key == passkey.passkey_key(0, 300, depth) and len(key) == 5 and key.isdigit()
        p = passkey.passkey_prompt(tokenizer, 300, depth, key)
        assert p.context_len == 300 and p.key_start > p.context_len
        assert tokenizer.decode(p.key_ids) == key
        context = tokenizer.decode(p.input_ids[0, :p.context_len])
        assert context.count(f"The pass key is {key}.") == 1 and context.startswith("<|im_start|>")
        assert tokenizer.decode(p.input_ids[0, p.key_position:]).startswith(f" The pass key is {key}.")
        assert tokenizer.decode(p.prompt_ids[0, p.context_len:]).endswith("assistant\nThe pass key is ")
        spots.append(p.key_position)
    assert spots[0] < spots[1] < spots[2]
    line = f" The pass key is {key}. Remember it. {key} is the pass key."
    assert tokenizer.decode(p.input_ids[0, spots[2]:p.context_len]) == line  # depth 1.0: it ends the filler
    assert passkey.passkey_key(1, 300, 0.5) != passkey.passkey_key(0, 300, 0.5)
    for kwargs, name in [(dict(depth=1.5, key="12345"), "depth"), (dict(depth=0.5, key="12a45"), "key"),
                         (dict(depth=0.5, key="12345", context_tokens=40), "context_tokens")]:
        with pytest.raises(ValueError, match=name):
            passkey.passkey_prompt(tokenizer, **{"context_tokens": 300, **kwargs})


def test_passkey_teacher_forced_verdict_equals_greedy_generation(real_model):
    """Uncompressed, the one-forward verdict (argmax right at every key digit) is what real greedy
    decoding of the prompt does: it reproduces the key (SmolLM2 retrieves at a few hundred tokens)."""
    model, tokenizer = real_model
    p = passkey.passkey_prompt(tokenizer, 400, 0.5, passkey.passkey_key(0, 400, 0.5))
    res = kl.sweep(model, p.input_ids, p.context_len, [kl.EvalConfig(1.0)])[0]
    generated = decode.generate_greedy(model, p.prompt_ids, len(p.key_ids))
    assert passkey.span_metrics(res, p.key_start)["correct"]
    assert torch.equal(generated, p.key_ids)


def test_lowest_ratio_matching_full_stops_at_the_first_drop():
    """A recovery below the first drop does not count; a drop at the largest compressed ratio gives 1.0."""
    acc = pd.DataFrame(_acc({1.0: 1.0, 0.75: 1.0, 0.5: 2 / 3, 0.25: 1.0, 0.1: 0.0}))
    assert passkey.lowest_ratio_matching_full(acc, 256, "knorm") == 0.75
    acc = pd.DataFrame(_acc({1.0: 1.0, 0.75: 0.0, 0.5: 1.0}))
    assert passkey.lowest_ratio_matching_full(acc, 256, "knorm") == 1.0
    acc = pd.DataFrame(_acc({1.0: 0.0, 0.5: 0.0}))  # nothing retrieved uncompressed: every ratio "matches"
    assert passkey.lowest_ratio_matching_full(acc, 256, "knorm") == 0.5


def test_accuracy_table_and_claim_summary():
    """Wilson intervals per (context, policy, keep_ratio); the claim's verdict follows the numbers."""
    rows = []
    for seed in range(3):
        for policy in ("knorm", "random"):
            for r in (1.0, 0.5, 0.1):
                correct = r == 1.0 or (policy == "knorm" and (r == 0.5 or seed == 0))
                rows.append({"context": 256, "seed": seed, "depth": 0.5, "policy": policy, "keep_ratio": r,
                             "correct": correct, "digit_acc": float(correct)})
    df = pd.DataFrame(rows)
    acc = passkey.accuracy_table(df)
    assert len(acc) == 6 and set(acc.n) == {3}
    k = acc[(acc.policy == "knorm") & (acc.keep_ratio == 0.1)].iloc[0]
    assert k.accuracy == pytest.approx(1 / 3) and 0 < k.lo < k.accuracy < k.hi < 1
    assert passkey.samples_per_context(df) == {256: 3}
    claim = passkey.claim_summary(df, acc, [256], ["knorm", "random"], [1.0, 0.5, 0.1])
    assert claim["claim_90pct"]["verdict"] == "does not hold"   # 1 of 3: Wilson 6-79 %, below 100 %
    assert claim["claim_90pct"]["by_context"][256]["verdict"] == "fails"
    all_right = pd.DataFrame([{**x, "correct": True} for x in rows])
    acc_right = passkey.accuracy_table(all_right)   # 3 of 3 at keep 0.1: Wilson 44-100 %, too wide to call
    assert passkey.claim_summary(all_right, acc_right, [256], ["knorm"], [1.0, 0.1])["claim_90pct"]["verdict"] \
        == "not resolved"
    assert claim["claim_90pct"]["by_context"][256]["knorm_lowest_ratio_matching_full"] == 0.5
    assert claim["claim_90pct"]["by_context"][256]["best_policy_at_min"] == "knorm"
    assert claim["policy_independent_at_keep_1"] and claim["longest_context_retrieved_uncompressed"] == 256
    assert passkey.claim_summary(df, acc, [256], ["knorm", "random"], [1.0, 0.5])["claim_90pct"]["verdict"] == "untestable"


def test_passkey_check_sizes():
    good = {"contexts": [256, 512], "seeds": [1, 1], "depths": [0.0, 1.0], "long_depths": [0.5]}
    passkey.check_sizes(good, [1.0, 0.5])
    assert passkey.samples(good) == [(256, 0, 0.0), (256, 0, 1.0), (512, 0, 0.0), (512, 0, 1.0)]
    with pytest.raises(ValueError, match="seeds"):
        passkey.check_sizes({**good, "seeds": [1]}, [1.0])
    with pytest.raises(ValueError, match="depths"):
        passkey.check_sizes({**good, "depths": [1.5]}, [1.0])
    with pytest.raises(ValueError, match="keep_ratios"):
        passkey.check_sizes(good, [0.5])



def test_reference_protocol_verdict_equals_greedy_generation(real_model):
    """Under the reference protocol a sample counts as retrieved iff greedy decoding does it the way
    the paper's code does: prefill everything before the key (question included), take the first
    key token from those uncompressed logits, compress once, decode the rest
    (``decode.generate_greedy`` on the prompt). The question-agnostic rows are the sweep's verdicts."""
    model, tokenizer = real_model
    sample = (400, 0, 0.5)
    p = passkey.sample_prompt(model, tokenizer, *sample)
    configs = passkey.protocol_configs(["knorm", "random"], [1.0, 0.5, 0.25], [[0, 1], [0, 1, 12]])
    rows, _ = passkey.protocol_rows(model, tokenizer, [sample], configs)
    assert len(rows) == 2 * len(configs) == 2 * 9
    agnostic = kl.sweep(model, p.input_ids, p.context_len, configs)
    for cfg, res in zip(configs, agnostic):
        row = rows[(rows.protocol == "question-agnostic") & (rows.policy == cfg.policy)
                   & (rows.keep_ratio == cfg.keep_ratio) & (rows.skip == passkey.skip_label(cfg.skip_layers))]
        assert row.correct.item() == passkey.span_metrics(res, p.key_start)["correct"]
    verdicts = set()
    for cfg in configs:
        generated = decode.generate_greedy(model, p.prompt_ids, len(p.key_ids), cfg.keep_ratio, cfg.policy,
                                           cfg.skip_layers)
        row = rows[(rows.protocol == "reference") & (rows.policy == cfg.policy)
                   & (rows.keep_ratio == cfg.keep_ratio) & (rows.skip == passkey.skip_label(cfg.skip_layers))]
        assert row.correct.item() == torch.equal(generated, p.key_ids), cfg
        verdicts.add(row.correct.item())
    assert verdicts == {True, False}   # both outcomes occur: the comparison can fail


def test_protocol_claims_verdict_rule():
    """The claim is accuracy within the margin of the uncompressed accuracy: holds when the Wilson
    interval lies at or above that line, fails when below; otherwise not resolved. One failure in
    two samples is not a verdict."""
    rows = []
    for protocol, n_right in (("question-agnostic", 0), ("reference", 40), ("x", 30)):
        for i in range(40):
            rows.append({"protocol": protocol, "skip": "skip (0, 1)", "policy": "knorm", "keep_ratio": 1.0,
                         "correct": True, "digit_acc": 1.0})
            rows.append({"protocol": protocol, "skip": "skip (0, 1)", "policy": "knorm", "keep_ratio": 0.1,
                         "correct": i < n_right, "digit_acc": 1.0})
    acc = passkey.accuracy_table(pd.DataFrame(rows), by=("protocol", "skip", "policy", "keep_ratio"))
    claims = {c["protocol"]: c for c in passkey.protocol_claims(acc, 0.1)}
    assert claims["question-agnostic"]["verdict"] == "fails" and claims["question-agnostic"]["n"] == 40
    assert claims["reference"]["verdict"] == "holds" and claims["reference"]["uncompressed"] == 1.0
    assert claims["x"]["verdict"] == "fails"   # 75 %: Wilson 60-86 %, below 100 % - 10 points
    few = passkey.accuracy_table(pd.DataFrame([r for r in rows if r["protocol"] == "x"][:6]),
                                 by=("protocol", "skip", "policy", "keep_ratio"))
    assert passkey.protocol_claims(few, 0.1)[0]["verdict"] == "not resolved"   # 3 of 3: too few to call
    assert passkey.claim_verdict(0.09, 0.91, 1.0) == "not resolved"              # 1 of 2 right
    assert passkey.claim_verdict(0.0, 0.56, 0.0) == "not resolved"               # nothing retrieved uncompressed
    assert passkey.claim_verdict(0.9, 1.0, 0.7) == "not resolved"                # unreliable uncompressed
    assert passkey.claim_verdict(0.61, 0.86, 1.0) == "fails" and passkey.claim_verdict(0.91, 1.0, 1.0) == "holds"
    assert passkey.reliable(passkey.RELIABLE) and not passkey.reliable(passkey.RELIABLE - 0.01)
    text = passkey.protocols_text({"parameters": {"sizes": {"protocol_context": 1024, "protocol_seeds": 8, "depths": [0.5]}},
                                   "results": {"protocol_n_samples": 40, "protocol_claims": [
                                       {**claims["reference"], "uncompressed": 0.7}, claims["question-agnostic"]]}})
    assert text.count("uncompressed retrieval is not reliable here") == 1
