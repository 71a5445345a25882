"""Benchmarks for ``ingest``: each row compares the pipeline with a bare baseline measured in the same run."""

from __future__ import annotations
