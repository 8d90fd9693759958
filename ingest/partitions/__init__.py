"""The partition manager: monthly range partitions made ahead, retention
(drop, detach or archive), status. Other packages use what this module
exports, never its modules."""

from ingest.partitions.manager import (
    MODES,
    MaintenanceReport,
    PartitionManager,
    Policy,
    StatusReport,
    add_months,
    bound_month,
    detach_statement,
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
    "month_bound",
    "month_start",
    "partition_name",
    "shift_months",
]
