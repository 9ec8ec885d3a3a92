"""knorm_study.explore: the explorer's checks."""

from __future__ import annotations

import pytest

from knorm_study import explore


def test_explorer_setting_checks(tiny32):
    ok = dict(keep_ratio=0.5, policy="knorm", skip_layers=[0, 1], position_mode="absolute", layer=2, kv_head=0,
              max_tokens=512)
    explore.Explorer.check_setting(tiny32, **ok)
    for bad, match in ((dict(keep_ratio=0.01), "keep_ratio"), (dict(keep_ratio=0.33), "keep_ratio"),
                       (dict(policy="h2o"), "policy"), (dict(skip_layers=[5]), "skip_layers"),
                       (dict(skip_layers=None), "skip_layers"), (dict(layer=4), "layer"), (dict(kv_head=2), "kv_head"),
                       (dict(max_tokens=100_000), "max_tokens")):
        with pytest.raises(ValueError, match=match):
            explore.Explorer.check_setting(tiny32, **{**ok, **bad})

