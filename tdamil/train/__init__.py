"""Local training and evaluation of MIL models on bags of patch features.

* ``tdamil.train.metrics``  classification metrics with a fixed key set (:data:`METRIC_KEYS`)
* ``tdamil.train.engine``   :class:`TrainConfig`, ``train_one_epoch``, ``evaluate``, ``fit``, checkpoints
* ``tdamil.train.cli``      the ``tdamil-train`` console script
"""
