"""A whole federation on one machine (installed as ``tdamil.simulation``).

This layer sits above the apps: it builds the same ServerApp (``tdamil.server``) and ClientApp
(``tdamil.client``) a deployment runs and drives them with an in-process Grid or Flower's Ray
engine. ``config`` reads the simulation YAML, ``sites`` builds the virtual sites, ``engines``
runs the federation, ``compare`` trains the same-budget baselines, ``cli`` is ``tdamil-simulate``.
"""
