"""The platform's own history: importing its logs (`history.imports`, schema `history.schema`) into
day-partitioned Parquet of validated attempt events (`history.store`).

It stands above the server (it validates with the server's own checks) and below the simulator and
the command line.
"""

from history.errors import HistoryError
from history.imports import ImportRefused, ImportSummary, import_file, import_files
from history.store import read_events

__all__ = ["HistoryError", "ImportRefused", "ImportSummary", "import_file", "import_files", "read_events"]
