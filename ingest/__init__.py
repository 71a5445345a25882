"""ingest: DICOM in (C-STORE, drop folder, archive replay), FHIR R4 ImagingStudy out."""

from __future__ import annotations

import logging

__all__ = ["__version__"]

logging.getLogger("ingest").addHandler(logging.NullHandler())

_version: str | None = None


def __getattr__(name: str) -> str:
    # ``__version__`` is read from the installed metadata on first use only: importlib.metadata costs
    # tens of milliseconds at start-up, and only ``--version``, the creator Device and status need it.
    global _version
    if name != "__version__":
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    if _version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            _version = version("ingest")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            _version = "0.0.0"
    return _version
