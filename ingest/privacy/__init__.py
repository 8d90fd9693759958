"""Privacy operations: erasure of a visitor everywhere (``erasure``)."""

from ingest.privacy.erasure import Erasure, ErasureReport, erase, status

__all__ = ["Erasure", "ErasureReport", "erase", "status"]
