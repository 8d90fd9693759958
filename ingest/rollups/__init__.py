"""The analysis tables of the source documents, kept fresh incrementally (issue 24).

``refresh`` recomputes the (shop, day) or (shop, experiment) groups that received
events since a rollup's watermark; ``status`` reports each rollup's watermark and lag.
"""

from ingest.rollups.incremental import (
    ROLLUPS,
    RefreshResult,
    RollupStatus,
    refresh,
    status,
)

__all__ = ["ROLLUPS", "RefreshResult", "RollupStatus", "refresh", "status"]
