"""A whole federation on one machine (installed as ``tdamil.simulation``).

This layer sits above the apps: it builds the same ServerApp (``tdamil.server``) and ClientApp
(``tdamil.client``) a deployment runs and drives them with an in-process Grid or Flower's Ray
engine. ``config`` reads the simulation YAML, ``sites`` builds the virtual sites, ``resources``
checks what they ask for against the machine or Ray cluster, ``engines`` runs the federation,
``compare`` trains the same-budget baselines and ``report`` writes the comparison, ``folds`` /
``crossval`` run k-fold cross-validation, ``cli`` is ``tdamil-simulate``.
"""
