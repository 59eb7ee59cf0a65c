"""Statistics for reporting results: bootstrap confidence intervals (:mod:`.bootstrap`), DeLong's
test for AUROC (:mod:`.delong`) and paired model comparisons (:mod:`.paired`)."""

from tdamil.stats.bootstrap import CI_METRICS, Difference, Interval, bootstrap_ci, format_interval, interval_columns, paired_bootstrap
from tdamil.stats.delong import DeLongResult, auroc_variance, delong_test
from tdamil.stats.paired import compare_predictions, holm, short_verdict, verdict

__all__ = [
    "CI_METRICS",
    "Difference",
    "Interval",
    "bootstrap_ci",
    "format_interval",
    "interval_columns",
    "paired_bootstrap",
    "DeLongResult",
    "auroc_variance",
    "delong_test",
    "compare_predictions",
    "holm",
    "short_verdict",
    "verdict",
]
