"""Record types, Arrow schemas, ledger vocabulary and manifest layout shared by every stage."""

from schemas.records import (  # noqa: F401
    DUPLICATE,
    ERROR,
    KEPT,
    LEDGER_SCHEMA,
    PAIR_SCHEMA,
    REASON_OK,
    REJECTED,
    STATUSES,
    LedgerRow,
    Outcome,
    Pair,
)

__all__ = [
    "DUPLICATE", "ERROR", "KEPT", "LEDGER_SCHEMA", "PAIR_SCHEMA", "REASON_OK", "REJECTED", "STATUSES",
    "LedgerRow", "Outcome", "Pair",
]
