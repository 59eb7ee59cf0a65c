"""What happened to each slide of an extraction run: results, the summary table, failure reasons.

Every failure carries a one-line reason (naming the file) and a fix; the table shows both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from .encoders import EncoderError
from .jobs import SlideJob
from .reader import MissingMppError, SlideError, SlideNotFoundError, SlideOpenError, SlideReadError

logger = logging.getLogger("tdamil.wsi.extract")

__all__ = ["SlideResult", "ExtractionSummary", "NoTissueError", "failure", "clean_reason", "READ_ERRORS"]


@dataclass
class SlideResult:
    """What happened to one slide.

    status:      ``extracted``, ``skipped`` (same settings already on disk), ``busy`` (another
                 extraction process holds the slide's claim) or ``failed``.
    reason/fix:  for failures: what went wrong (names the file) and what to do.
    timings:     seconds spent opening + segmenting, reading + encoding, encoder alone, writing.
    """

    slide_id: str
    status: Literal["extracted", "skipped", "busy", "failed"]
    path: Optional[Path] = None
    slide_path: Optional[Path] = None
    n_patches: int = 0
    seconds: float = 0.0
    read_level: Optional[int] = None
    reason: str = ""
    fix: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ExtractionSummary:
    """Outcome of :func:`extract_site`: one :class:`SlideResult` per slide, in input order."""

    results: list[SlideResult]
    encoder: str
    features_dir: Path
    seconds: float = 0.0

    @property
    def extracted(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "extracted"]

    @property
    def skipped(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def busy(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "busy"]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.extracted)

    def table(self) -> Any:
        """A rich Table: one row per slide, then totals."""
        from rich.table import Table

        t = Table(title=f"Feature extraction ({self.encoder}) -> {self.features_dir}", show_lines=False)
        for col, kw in (("slide", {}), ("status", {}), ("patches", {"justify": "right"}),
                        ("level", {"justify": "right"}), ("s", {"justify": "right"}), ("problem", {"ratio": 3}),
                        ("fix", {"ratio": 2})):
            t.add_column(col, **kw)
        style = {"extracted": "green", "skipped": "cyan", "busy": "yellow", "failed": "bold red"}
        for r in self.results:
            t.add_row(r.slide_id, f"[{style[r.status]}]{r.status}[/]", str(r.n_patches) if r.n_patches else "",
                      "" if r.read_level is None else str(r.read_level), f"{r.seconds:.1f}", _first_sentence(r.reason), r.fix)
        t.caption = (f"{len(self.extracted)} extracted ({self.n_patches} patches), {len(self.skipped)} skipped, "
                     f"{len(self.busy)} busy in other processes, {len(self.failed)} failed in {self.seconds:.1f} s")
        return t

    def print(self, console: Any = None) -> None:
        """Print :meth:`table` (to ``console`` or a new rich Console on stderr)."""
        from rich.console import Console

        (console or Console(stderr=True)).print(self.table())


def _first_sentence(text: str) -> str:
    """The table shows the first sentence of a failure; the log has all of it."""
    head, sep, _ = text.partition(". ")
    return head + ("." if sep else "")


def fix_for(exc: BaseException) -> str:
    if isinstance(exc, SlideNotFoundError):
        return "put the slide file in data.slides_dir or set its slide_path in the manifest"
    if isinstance(exc, MissingMppError):
        return "set the slide's resolution: an 'mpp' column in the manifest or extraction.mpp_overrides"
    if isinstance(exc, SlideOpenError):
        return "re-copy the file from the scanner or remove the slide from the manifest"
    if isinstance(exc, SlideReadError):
        return "the slide has corrupt tiles: re-export or re-copy it, or remove it from the manifest"
    if isinstance(exc, NoTissueError):
        return "look at the QC thumbnail; lower extraction.min_tissue or tissue.min_saturation if tissue was missed"
    if isinstance(exc, SlideError):
        return "fix the slide or its settings as the message says"
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "lower extraction.batch_size"
    return "see the log above for the traceback; fix and run tdamil-extract again (finished slides are kept)"


class NoTissueError(SlideError):
    """No grid cell holds enough tissue."""


def clean_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the final line
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SlideError) else text


def failure(job: SlideJob, exc: BaseException, seconds: float) -> SlideResult:
    reason = clean_reason(exc)
    if isinstance(exc, (SlideError, EncoderError)):
        logger.error("%s: FAILED: %s", job.slide_id, reason)
    else:
        logger.error("%s: FAILED with an unexpected error", job.slide_id, exc_info=exc)
    return SlideResult(job.slide_id, "failed", None, job.path, 0, seconds, reason=reason, fix=fix_for(exc))


#: Exception classes by name, to rebuild a DataLoader worker's read error in the main process.
READ_ERRORS = {"SlideReadError": SlideReadError, "SlideOpenError": SlideOpenError, "SlideNotFoundError": SlideNotFoundError,
                "MissingMppError": MissingMppError}
