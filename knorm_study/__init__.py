"""The study machinery beside ``knorm_lib`` (the core): one module per study question, each
importing ``knorm_lib`` and never the reverse. Import what you use, e.g.
``from knorm_study import passkey, runtime``; importing this package imports nothing else."""
