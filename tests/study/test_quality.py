"""knorm_study.quality: thresholds and generation agreement."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import CONTEXT, _threshold_rows
from knorm_study import decode, quality


def test_keep_ratio_thresholds_need_every_larger_ratio_to_pass():
    """1 %: 0.9 passes (+0.5 %), 0.5 fails (+3 %), so 0.25's lucky dip (+2 %) does not count for it;
    5 %: everything down to 0.25 passes, 0.1 (+20 %) fails."""
    rows = _threshold_rows({1.0: (10, 20), 0.9: (10.05, 20.1), 0.5: (10.3, 20.6), 0.25: (10.2, 20.4), 0.1: (12, 24)})
    out = quality.keep_ratio_thresholds(rows, ["variant"], (0.01, 0.05))
    assert out.to_dict("records") == [{"variant": "v", "within_0.01": 0.9, "within_0.05": 0.25}]
    bad = _threshold_rows({1.0: (10, 20), 0.9: (11, 22), 0.5: (10, 20)})
    assert quality.keep_ratio_thresholds(bad, ["variant"], (0.05,))["within_0.05"].isna().all()


def test_keep_ratio_thresholds_bad_input():
    with pytest.raises(ValueError, match="keep_ratio 1.0"):
        quality.keep_ratio_thresholds(_threshold_rows({0.9: (1, 1)}), ["variant"])
    with pytest.raises(ValueError, match="missing column"):
        quality.keep_ratio_thresholds([{"variant": "v", "keep_ratio": 1.0, "ppl": 1}], ["variant"])
    with pytest.raises(ValueError, match="tolerances"):
        quality.keep_ratio_thresholds(_threshold_rows({1.0: (1, 1)}), ["variant"], (-0.1,))


def test_generation_agreement():
    """generation_agreement: matching-prefix length and per-position agreement of two token lists."""
    a = torch.tensor([5, 6, 7, 8, 9])
    assert quality.generation_agreement(a, a.clone()) == {"matching_prefix": 5, "token_agreement": 1.0}
    b = a.clone()
    b[2] = 0
    assert quality.generation_agreement(a, b) == {"matching_prefix": 2, "token_agreement": pytest.approx(0.8)}
    b[0] = 0
    assert quality.generation_agreement(a, b) == {"matching_prefix": 0, "token_agreement": pytest.approx(0.6)}
    # different lengths compare over the shorter one
    assert quality.generation_agreement(a, a[:3]) == {"matching_prefix": 3, "token_agreement": 1.0}


def test_generation_agreement_on_generated_tokens(tiny64, ids):
    """On real generations, agreement is consistent with the tokens themselves."""
    prompt = ids[:, :CONTEXT]
    full = decode.generate_greedy(tiny64, prompt, 16)
    comp = decode.generate_greedy(tiny64, prompt, 16, keep_ratio=0.1, skip_layers=())
    agree = quality.generation_agreement(comp, full)
    same = (comp == full)
    assert agree["token_agreement"] == pytest.approx(same.float().mean().item())
    p = agree["matching_prefix"]
    assert same[:p].all() and (p == len(full) or not same[p])



def test_paired_comparisons_pair_by_document():
    """knorm minus each variant in log perplexity, paired on the documents both were run on;
    other protocols and keep_ratios are ignored."""
    import math

    docs = [f"d{i}" for i in range(6)]
    rows = [{"protocol": "prefill", "keep_ratio": 0.5, "variant": "knorm", "document": d, "ppl": 10.0 + i}
            for i, d in enumerate(docs)]
    rows += [{"protocol": "prefill", "keep_ratio": 0.5, "variant": "random", "document": d, "ppl": 2 * (10.0 + i)}
             for i, d in enumerate(docs[:5])]
    rows += [{"protocol": "streaming", "keep_ratio": 0.5, "variant": "random", "document": "d0", "ppl": 1.0},
             {"protocol": "prefill", "keep_ratio": 0.25, "variant": "random", "document": "d0", "ppl": 1.0}]
    (c,) = quality.paired_comparisons(rows, "prefill", 0.5)
    assert c["variant"] == "random" and c["n"] == 5 and c["resolved"]
    assert c["mean"] == pytest.approx(-math.log(2)) and c["lo"] == pytest.approx(c["hi"])
    assert quality.paired_comparisons(rows, "streaming", 0.5) == []  # no knorm there: nothing to pair


def test_matched_memory_interpolates_within_each_line_and_pairs_by_document():
    """Each line is interpolated linearly in the kept fraction between its own measured points,
    per document (log PPL ratio to the document's full cache); outside its range it is not
    measured; the difference to per-token knorm is paired by document (variant minus knorm)."""
    import math

    rows = []
    for i, doc in enumerate(f"d{k}" for k in range(5)):
        full = 10.0 + i
        rows.append({"variant": "full cache", "document": doc, "ppl": full, "mean_kept_fraction": 1.0})
        # knorm: log ratio 1.0 at fraction 0.2 and 0.0 at 0.6, so 0.5 at 0.4
        rows += [{"variant": "knorm", "document": doc, "ppl": full * math.e, "mean_kept_fraction": 0.2},
                 {"variant": "knorm", "document": doc, "ppl": full, "mean_kept_fraction": 0.6}]
        # a burst measured only between 0.35 and 0.45, a quarter of knorm's log ratio at 0.4
        rows += [{"variant": "burst", "document": doc, "ppl": full * math.exp(0.25), "mean_kept_fraction": f}
                 for f in (0.35, 0.45)]
    out = {(x["variant"], x["kept_fraction"]): x for x in quality.matched_memory(rows, ["knorm", "burst"], [0.4, 0.5])}
    assert out[("knorm", 0.4)]["ppl_ratio"] == pytest.approx(math.exp(0.5))
    assert out[("knorm", 0.5)]["ppl_ratio"] == pytest.approx(math.exp(0.25))
    assert out[("burst", 0.5)]["n"] == 0 and math.isnan(out[("burst", 0.5)]["ppl_ratio"])
    burst = out[("burst", 0.4)]
    assert burst["n"] == 5 and burst["vs_knorm_mean"] == pytest.approx(-0.25) and burst["vs_knorm_resolved"]
    assert "burst | 0.5 | 0 | outside the measured range" in quality.matched_memory_markdown(list(out.values()))


def test_schedule_variants():
    """Bursts per prune_after and the recent window, each at every keep_ratio; no window when 0."""
    v = quality.schedule_variants([0.5, 0.1], [256, 512], 64, [0, 1])
    assert [label for label, _ in v] == ["knorm burst P=256"] * 2 + ["knorm burst P=512"] * 2 + ["knorm + recent 64"] * 2
    assert v[0][1] == dict(policy="knorm", keep_ratio=0.5, prune_after=256, skip_layers=(0, 1))
    assert v[-1][1]["recent_window"] == 64 and "prune_after" not in v[-1][1]
    assert len(quality.schedule_variants([0.5], [256], 0, [])) == 1


def test_variants_add_the_global_only_lines_on_a_hybrid_model_only():
    """On a hybrid model each layer-choice policy also runs with global layers only (its local layers
    skipped too); on a Llama the choices are the same layers, so only the first runs, and
    knorm_prenorm (no QK-norm there) is dropped rather than run as a copy of knorm."""
    from helpers import tiny_family
    from knorm_study.probes._models import tiny_gemma3_hybrid

    policies, choice = ["knorm", "knorm_prenorm", "random"], ["knorm", "knorm_prenorm"]
    hybrid = quality.variants(policies, [0, 1], False, tiny_gemma3_hybrid(), ["all", "global"], choice)
    assert hybrid == [("knorm", "knorm", (0, 1)), ("knorm_prenorm", "knorm_prenorm", (0, 1)), ("random", "random", (0, 1)),
                      ("knorm (global layers)", "knorm", (0, 1, 2, 4)),
                      ("knorm_prenorm (global layers)", "knorm_prenorm", (0, 1, 2, 4))]
    llama = quality.variants(policies, [0, 1], True, tiny_family("llama")[0], ["all", "global"], choice)
    assert [label for label, _, _ in llama] == ["knorm", "knorm (all layers)", "random"]
    with pytest.raises(ValueError, match="compress_layers"):
        quality.variants(policies, [0, 1], False, tiny_gemma3_hybrid(), ["all", "local"], choice)


def test_matched_kv_bytes_interpolates_the_reference_at_the_same_bytes():
    """Global-only at 0.9 of the full cache's bytes against every-layer points at 1.0 (the full cache)
    and 0.8: the reference's log ratio is interpolated halfway, per document, then bootstrapped;
    a point beyond the reference's range is left out."""
    def row(doc, variant, k, ratio, local, glob):
        return {"protocol": "prefill", "document": doc, "variant": variant, "keep_ratio": k, "ppl": 10 * ratio,
                "ppl_ratio": ratio, "by_layer_type": {"sliding_attention": {"kv_bytes": local},
                                                      "full_attention": {"kv_bytes": glob}}}
    rows = []
    for d in range(5):
        rows += [row(f"d{d}", "full cache", 1.0, 1.0, 80, 20), row(f"d{d}", "knorm", 0.5, 1.2 + 0.01 * d, 70, 10),
                 row(f"d{d}", "knorm (global layers)", 0.5, 1.05, 80, 10),
                 row(f"d{d}", "knorm (global layers)", 0.1, 1.3, 60, 2)]
    matched = quality.matched_kv_bytes(rows, "prefill", "knorm (global layers)", "knorm")
    assert [m["keep_ratio"] for m in matched] == [0.5]   # 0.62 of the bytes lies below knorm's 0.8
    want = [math.log(1.05) - 0.5 * math.log(1.2 + 0.01 * d) for d in range(5)]
    assert matched[0]["kv_fraction"] == pytest.approx(0.9)
    assert matched[0]["mean"] == pytest.approx(sum(want) / 5) and matched[0]["n"] == 5
    assert quality.matched_kv_bytes(rows, "prefill", "random (global layers)", "random") == []


def test_baselines_headline_says_which_policy_wins_per_protocol():
    """README's line for another model: knorm minus random and high_norm in log PPL, paired by
    document; a verdict only where the interval excludes 0, and nothing when neither was run."""
    rows = []
    for d in range(12):
        wobble = 0.01 * ((d * 7) % 5 - 2)
        for proto, ppl in (("prefill", {"knorm": 12.0, "random": 10.0, "high_norm": 12.0 * math.exp(0.05 if d % 2 else -0.05)}),
                           ("streaming", {"knorm": 10.0, "random": 20.0, "high_norm": 30.0})):
            for variant, value in ppl.items():
                rows.append({"protocol": proto, "variant": variant, "keep_ratio": 0.5, "document": f"doc{d}",
                             "ppl": value * (1 + wobble)})
    line = quality.baselines_headline({"identity": {"model_name": "org/other"}, "results": {"rows": rows}})
    prefill, streaming = line.split("prefill: ")[1].split("; streaming: ")
    assert f"random {math.log(1.2):+.3f}" in prefill and "(random better, n = 12)" in prefill
    assert "(not resolved, n = 12)" in prefill   # high_norm: the differences straddle 0
    assert "(knorm better, n = 12)" in streaming and f"high_norm {math.log(1 / 3):+.3f}" in streaming
    assert quality.baselines_headline({"identity": {}, "results": {"rows": [
        r for r in rows if r["variant"] == "knorm"]}}) == ""
