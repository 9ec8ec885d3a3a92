"""The probes of every module that computes recorded numbers (``knorm_study.fingerprint``): one
file per module, each probe registered with ``@probe("<module>")``. Importing this package
registers them all."""

from knorm_study.probes import (  # noqa: F401
    attention, claims, core, decode, explore, intervals, norm_distributions, passkey, position_order, quality,
    runtime, speed,
)
