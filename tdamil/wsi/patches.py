"""Reading patches in DataLoader workers for the extraction pipeline.

One pool of workers serves every slide of a run: each :class:`PatchKey` names the slide file,
its resolution and read plan, so no worker restarts per slide. Read errors come back as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .extract_report import clean_reason
from .grid import ReadPlan
from .reader import open_slide

__all__ = ["PatchKey", "PatchDataset", "collate_patches"]


@dataclass(frozen=True)
class PatchKey:
    """What a DataLoader worker needs to read one patch (passed as the dataset 'index')."""

    slide: int
    path: Path
    mpp: float
    backend: str
    plan: ReadPlan
    x: int
    y: int


class PatchDataset(Dataset):
    """Reads patches named by :class:`PatchKey`: ``(slide, uint8 (3, p, p), error text)``.

    Keys carry the slide file, resolution and read plan, so one pool of DataLoader workers serves
    every slide of a run (no worker start-up per slide) and slides can be prepared while earlier
    ones are still being read. Each worker keeps its own slide handles (at most two open). A
    read error is returned as text, not raised, so one corrupt slide cannot stop the run.
    """

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self._open: dict[Path, Any] = {}

    def __len__(self) -> int:  # keys come from the batch sampler; the length is not used
        return 0

    def _slide(self, key: PatchKey) -> Any:
        slide = self._open.get(key.path)
        if slide is None:
            while len(self._open) >= 2:
                self._open.pop(next(iter(self._open))).close()
            slide = open_slide(key.path, mpp_override=key.mpp, backend=key.backend,  # type: ignore[arg-type]
                               warn_override=False)
            self._open[key.path] = slide
        return slide

    def __getitem__(self, key: PatchKey) -> tuple[int, torch.Tensor, str]:  # type: ignore[override]
        try:
            patch = key.plan.read(self._slide(key), key.x, key.y)
            return key.slide, torch.from_numpy(patch).permute(2, 0, 1), ""
        except Exception as exc:  # reported per slide by the main process
            bad = self._open.pop(key.path, None)
            if bad is not None:
                bad.close()
            empty = torch.zeros((3, self.patch_size, self.patch_size), dtype=torch.uint8)
            return key.slide, empty, type(exc).__name__ + "\x00" + clean_reason(exc)

    def __getstate__(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "_open": {}}


def collate_patches(items: list[tuple[int, torch.Tensor, str]]) -> tuple[int, torch.Tensor, str]:
    errors = [e for _, _, e in items if e]
    return items[0][0], torch.stack([t for _, t, _ in items]), errors[0] if errors else ""
