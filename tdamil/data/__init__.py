"""Data for training: feature h5 files, manifests, bag datasets, patient-level splits, digits bags.

Modules (import them directly; this package imports nothing heavy on its own):

* ``tdamil.data.config``    the ``data:`` section of a site's YAML (:class:`DataConfig`)
* ``tdamil.data.h5``        feature h5 read/write (TRIDENT / CLAM compatible)
* ``tdamil.data.manifest``  the slide manifest CSV, validated
* ``tdamil.data.bags``      :class:`Bag`, :class:`FeatureBagDataset`, :class:`InMemoryBagDataset`
* ``tdamil.data.splits``    patient-level stratified train/val/test splits and k-fold CV
* ``tdamil.data.digits``    the embedded MNIST-bags style benchmark on scikit-learn's digits
"""
