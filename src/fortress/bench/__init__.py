"""Benchmarking: result records, plots, and the demo pipeline."""

from __future__ import annotations

from fortress.bench.records import ResultRecord, append_record, read_records

__all__ = ["ResultRecord", "append_record", "read_records"]
