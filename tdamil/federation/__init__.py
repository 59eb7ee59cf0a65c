"""Shared Flower helpers for the coordinator, the hospital sites and the local simulation.

* ``task``       build the model from the run config, state dict <-> ArrayRecord, local train / eval
* ``records``    the exact message layout (keys, metric names) both sides agree on
* ``strategies`` FedAvg / FedProx / FedAdam / FedYogi with NaN-aware metric averaging
* ``loop``       the round loop (resume with a round offset, server-side evaluation, checkpoints)
* ``checkpoint`` atomic global-model checkpoints + the best one by a chosen metric
* ``audit``      JSONL audit log: who took part, what they sent (sizes, metrics), checkpoints, failures
* ``history``    per-round, per-site metrics CSV/JSONL and learning-curve plots
* ``grids``      an in-process Grid (simulation) and a Grid wrapper that never waits forever
"""
