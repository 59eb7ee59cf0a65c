"""Bags of patch features: the unit a MIL model sees (one slide = one bag).

* :class:`Bag`                one slide's features ``[n, D]``, its label and id (plus coords).
* :class:`BagDataset`         the protocol training and evaluation code relies on.
* :class:`FeatureBagDataset`  reads ``<features_dir>/<slide_id>.h5`` lazily, one file per access,
                              through :func:`tdamil.data.h5.read_features`.
* :class:`InMemoryBagDataset` bags held in memory (digits bags, tests, small cohorts).
* :class:`ConcatBagDataset`   several datasets as one (a pooled, centralised training set), as lazy
                              as its parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["Bag", "BagDataset", "BagFileError", "FeatureBagDataset", "InMemoryBagDataset", "ConcatBagDataset",
           "class_counts"]


@dataclass
class Bag:
    """One slide as a bag of patch features.

    features:        float32 tensor ``[n, D]``.
    label:           class index.
    slide_id:        slide name.
    coords:          int64 ``[n, 2]`` level-0 top-left x, y of each patch, when known.
    instance_labels: per-patch labels when known (digits bags: 1 = target digit), for checking scores.
    """

    features: torch.Tensor
    label: int
    slide_id: str
    coords: Optional[torch.Tensor] = None
    instance_labels: Optional[torch.Tensor] = None


@runtime_checkable
class BagDataset(Protocol):
    """What the training engine needs from a dataset of bags."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Bag: ...

    @property
    def labels(self) -> list[int]: ...

    @property
    def slide_ids(self) -> list[str]: ...

    @property
    def patient_ids(self) -> list[str]: ...

    @property
    def in_dim(self) -> int: ...

    @property
    def num_classes(self) -> int: ...


class BagFileError(ValueError):
    """A feature file is missing, unreadable or has the wrong shape. Names the file and the fix."""


def class_counts(dataset: BagDataset) -> list[int]:
    """Number of bags per class (length ``num_classes``)."""
    counts = [0] * dataset.num_classes
    for y in dataset.labels:
        counts[int(y)] += 1
    return counts


def _patients(patient_ids: Optional[Sequence[str]], slide_ids: list[str]) -> list[str]:
    if patient_ids is None:
        return list(slide_ids)
    if len(patient_ids) != len(slide_ids):
        raise ValueError(f"{len(patient_ids)} patient ids for {len(slide_ids)} bags; give one per bag.")
    return [str(p) for p in patient_ids]


class InMemoryBagDataset:
    """Bags kept in memory.

    Args:
        features: one array/tensor ``[n_i, D]`` per bag (all with the same D).
        labels: class index per bag.
        slide_ids: a name per bag (default ``bag_0000``, ...).
        num_classes: number of classes (default: ``max(labels) + 1``, at least 2).
        coords: optional ``[n_i, 2]`` per bag.
        instance_labels: optional per-patch labels per bag.
        patient_ids: patient per bag (default: each bag its own patient); confidence intervals
            resample patients, so a patient's bags move together.
    """

    def __init__(
        self,
        features: Sequence[Any],
        labels: Sequence[int],
        slide_ids: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        coords: Optional[Sequence[Any]] = None,
        instance_labels: Optional[Sequence[Any]] = None,
        patient_ids: Optional[Sequence[str]] = None,
    ) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature arrays but {len(labels)} labels; give one label per bag.")
        self._features = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in features]
        for i, f in enumerate(self._features):
            if f.ndim != 2 or f.shape[0] == 0:
                raise ValueError(f"bag {i} has shape {tuple(f.shape)}; expected [n_patches >= 1, D].")
        dims = {int(f.shape[1]) for f in self._features}
        if len(dims) > 1:
            raise ValueError(f"bags have different feature dims {sorted(dims)}; all bags must share one D.")
        self._labels = [int(y) for y in labels]
        self._ids = list(slide_ids) if slide_ids is not None else [f"bag_{i:04d}" for i in range(len(labels))]
        if len(self._ids) != len(self._labels):
            raise ValueError("slide_ids must have one entry per bag.")
        self._patients = _patients(patient_ids, self._ids)
        self._num_classes = int(num_classes) if num_classes is not None else max(2, max(self._labels, default=0) + 1)
        if any(y < 0 or y >= self._num_classes for y in self._labels):
            raise ValueError(f"labels must lie in 0..{self._num_classes - 1}.")
        self._dim = dims.pop() if dims else 0
        self._coords = [None if c is None else torch.as_tensor(np.asarray(c), dtype=torch.int64) for c in coords] if coords is not None else None
        self._inst = [None if c is None else torch.as_tensor(np.asarray(c)) for c in instance_labels] if instance_labels is not None else None

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Bag:
        return Bag(
            features=self._features[index],
            label=self._labels[index],
            slide_id=self._ids[index],
            coords=self._coords[index] if self._coords is not None else None,
            instance_labels=self._inst[index] if self._inst is not None else None,
        )

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def slide_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def patient_ids(self) -> list[str]:
        return list(self._patients)

    @property
    def in_dim(self) -> int:
        return self._dim

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def bag_sizes(self) -> list[int]:
        """Number of patches per bag."""
        return [int(f.shape[0]) for f in self._features]

    def subset(self, indices: Sequence[int]) -> "InMemoryBagDataset":
        """A dataset of the given bags (shares the tensors)."""
        idx = [int(i) for i in indices]
        return InMemoryBagDataset(
            [self._features[i] for i in idx],
            [self._labels[i] for i in idx],
            [self._ids[i] for i in idx],
            num_classes=self._num_classes,
            coords=[self._coords[i] for i in idx] if self._coords is not None else None,
            instance_labels=[self._inst[i] for i in idx] if self._inst is not None else None,
            patient_ids=[self._patients[i] for i in idx],
        )

    def __repr__(self) -> str:
        return f"InMemoryBagDataset({len(self)} bags, D={self.in_dim}, classes={self.num_classes}, counts={class_counts(self)})"


class FeatureBagDataset:
    """Bags read lazily from a feature cache: ``<features_dir>/<slide_id>.h5`` (one per slide).

    Files are opened only when a bag is accessed, so cohorts larger than memory work. Missing files
    are reported at construction (all at once, with the fix); a malformed file or a feature dim that
    differs from ``in_dim`` raises :class:`BagFileError` naming the file when it is read.

    Args:
        features_dir: folder of ``.h5`` feature files (``DataConfig.features_dir``).
        slide_ids: slides in this dataset.
        labels: class index per slide.
        num_classes: number of classes.
        in_dim: expected feature dim D. Default: taken from the first file.
        suffix: file suffix; ``.h5`` (this project / TRIDENT / CLAM) or ``.pt`` (CLAM).
        check_files: check every file exists now (recommended; off for very slow network shares).
        patient_ids: patient per slide (default: each slide its own patient).
    """

    def __init__(
        self,
        features_dir: str | Path,
        slide_ids: Sequence[str],
        labels: Sequence[int],
        num_classes: int,
        in_dim: Optional[int] = None,
        suffix: str = ".h5",
        check_files: bool = True,
        patient_ids: Optional[Sequence[str]] = None,
    ) -> None:
        if len(slide_ids) != len(labels):
            raise ValueError(f"{len(slide_ids)} slide ids but {len(labels)} labels; give one label per slide.")
        self.features_dir = Path(features_dir)
        self._ids = [str(s) for s in slide_ids]
        self._labels = [int(y) for y in labels]
        self._patients = _patients(patient_ids, self._ids)
        self._num_classes = int(num_classes)
        self._dim = int(in_dim) if in_dim is not None else None
        self.suffix = suffix
        if check_files:
            if not self.features_dir.is_dir():
                raise BagFileError(
                    f"{self.features_dir}: feature folder not found. Check data.features_dir, or run "
                    f"tdamil-extract to create the features first."
                )
            missing = [s for s in self._ids if not self.path(s).is_file()]
            if missing:
                shown = ", ".join(str(self.path(s)) for s in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise BagFileError(
                    f"feature file(s) missing for {len(missing)} of {len(self._ids)} slides: {shown}{more}. "
                    f"Run tdamil-extract for these slides, or remove them from the manifest."
                )

    @classmethod
    def from_manifest(cls, df: Any, features_dir: str | Path, **kwargs: Any) -> "FeatureBagDataset":
        """Build from a DataFrame of :func:`tdamil.data.manifest.load_manifest` (or a subset of it)."""
        classes = df.attrs.get("classes")
        num_classes = len(classes) if classes else int(df["label_index"].max()) + 1
        return cls(features_dir, df["slide_id"].tolist(), df["label_index"].tolist(), num_classes,
                   patient_ids=df["patient_id"].tolist(), **kwargs)

    def path(self, slide_id: str) -> Path:
        """Feature file of one slide."""
        return self.features_dir / f"{slide_id}{self.suffix}"

    def _read(self, slide_id: str) -> Any:
        from tdamil.data.h5 import read_features  # the WSI engineer's reader (h5 + CLAM .pt)

        path = self.path(slide_id)
        if not path.is_file():
            raise BagFileError(f"{path}: feature file not found. Run tdamil-extract for slide '{slide_id}'.")
        try:
            bag = read_features(path)
        except BagFileError:
            raise
        except ValueError as exc:  # FeatureFileError is a ValueError and already names the file
            raise BagFileError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError on damaged files
            raise BagFileError(
                f"{path}: cannot read features ({type(exc).__name__}: {exc}). The file is damaged or not a "
                f"feature file; delete it and run tdamil-extract again."
            ) from exc
        feats = np.asarray(bag.features)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise BagFileError(
                f"{path}: features have shape {feats.shape}; expected [n_patches >= 1, D]. The slide may have "
                f"no tissue patches; re-run tdamil-extract or remove the slide from the manifest."
            )
        if self._dim is None:
            self._dim = int(feats.shape[1])
        elif feats.shape[1] != self._dim:
            raise BagFileError(
                f"{path}: feature dim {feats.shape[1]} but this dataset expects {self._dim}. The file was made "
                f"with a different encoder; re-extract it with the site's encoder (tdamil-extract) or point "
                f"data.features_dir at the right cache."
            )
        return bag

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Bag:
        slide_id = self._ids[index]
        bag = self._read(slide_id)
        coords = getattr(bag, "coords", None)
        return Bag(
            features=torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)),
            label=self._labels[index],
            slide_id=slide_id,
            coords=None if coords is None else torch.as_tensor(np.asarray(coords), dtype=torch.int64),
        )

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def slide_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def patient_ids(self) -> list[str]:
        return list(self._patients)

    @property
    def in_dim(self) -> int:
        """Feature dim D (reads the first slide if it was not given)."""
        if self._dim is None:
            if not self._ids:
                raise ValueError("empty FeatureBagDataset has no feature dim; pass in_dim.")
            self._read(self._ids[0])
        assert self._dim is not None
        return self._dim

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def subset(self, indices: Sequence[int]) -> "FeatureBagDataset":
        """A dataset of the given slides, same folder and dim (no file checks repeated)."""
        idx = [int(i) for i in indices]
        return FeatureBagDataset(
            self.features_dir,
            [self._ids[i] for i in idx],
            [self._labels[i] for i in idx],
            self._num_classes,
            in_dim=self._dim,
            suffix=self.suffix,
            check_files=False,
            patient_ids=[self._patients[i] for i in idx],
        )

    def __repr__(self) -> str:
        return f"FeatureBagDataset({len(self)} slides in {self.features_dir}, classes={self.num_classes})"


class ConcatBagDataset:
    """The bags of several datasets, in order, without reading any: item ``i`` is fetched from its
    part when asked for, so pooling feature-file datasets keeps one bag in memory at a time."""

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("ConcatBagDataset needs at least one dataset.")
        classes = {int(p.num_classes) for p in parts}
        if len(classes) > 1:
            raise ValueError(f"datasets to pool have different class counts {sorted(classes)}.")
        self._parts = list(parts)
        self._index = [(k, i) for k, p in enumerate(self._parts) for i in range(len(p))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Bag:
        k, i = self._index[index]
        return self._parts[k][i]

    @property
    def labels(self) -> list[int]:
        return [y for p in self._parts for y in p.labels]

    @property
    def slide_ids(self) -> list[str]:
        return [s for p in self._parts for s in p.slide_ids]

    @property
    def patient_ids(self) -> list[str]:
        return [s for p in self._parts for s in p.patient_ids]

    @property
    def in_dim(self) -> int:
        return int(self._parts[0].in_dim)

    @property
    def num_classes(self) -> int:
        return int(self._parts[0].num_classes)

    def __repr__(self) -> str:
        return f"ConcatBagDataset({len(self)} bags from {len(self._parts)} datasets)"
