"""The analysis tables of the source documents, kept fresh incrementally (issue 24).

``refresh`` recomputes the (shop, day), (shop, experiment) or (shop, session) groups
of the rows loaded since a rollup's watermark; ``recompute`` one shop's (after an
erasure); ``status`` reports each rollup's watermark and lag.
"""

from ingest.rollups.incremental import (
    ROLLUPS,
    RefreshResult,
    RollupStatus,
    export_gauges,
    recompute,
    refresh,
    status,
)

__all__ = [
    "ROLLUPS",
    "RefreshResult",
    "RollupStatus",
    "export_gauges",
    "recompute",
    "refresh",
    "status",
]
