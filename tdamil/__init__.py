"""tdamil-fl: federated TDA-MIL (Top-Down Attention MIL) for whole-slide-image classification.

Data flows one way: slide -> patches -> features -> bags -> model -> federation.

* ``tdamil.wsi``      slide reading, tissue mask, patch grid, encoders, feature extraction
* ``tdamil.data``     feature h5 files, manifests, bag datasets, splits, the embedded digits bags
* ``tdamil.models``   TDA-MIL and the baselines (mean pooling, ABMIL, TransMIL, transformer-MIL)
* ``tdamil.train``    local training / evaluation engine and metrics
* ``tdamil.server``   the coordinator's Flower ServerApp (folder ``server/``)
* ``tdamil.client``   the hospital's Flower ClientApp (folder ``client/``)
"""

__version__ = "0.1.0"
