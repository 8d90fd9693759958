"""The partition manager: monthly range partitions made ahead, retention
(drop, detach or archive), status. Other packages use what this module
exports, never its modules: ``months`` (month math, names, bounds), ``model``
(policies, partitions, actions, reports), ``ddl`` (all partition SQL text),
``manager`` (the orchestration), ``archive`` (archive files)."""

from ingest.partitions.ddl import (
    detach_statement,
    lock_timeout,
    visitor_count,
    visitor_delete,
    visitor_match,
)
from ingest.partitions.manager import PartitionManager
from ingest.partitions.model import MODES, MaintenanceReport, Policy, StatusReport
from ingest.partitions.months import (
    add_months,
    bound_month,
    month_bound,
    month_start,
    partition_name,
    shift_months,
)

__all__ = [
    "MODES",
    "MaintenanceReport",
    "PartitionManager",
    "Policy",
    "StatusReport",
    "add_months",
    "bound_month",
    "detach_statement",
    "lock_timeout",
    "month_bound",
    "month_start",
    "partition_name",
    "shift_months",
    "visitor_count",
    "visitor_delete",
    "visitor_match",
]
