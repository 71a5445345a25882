"""ingest: DICOM in (C-STORE, drop folder, archive replay), FHIR R4 ImagingStudy out."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ingest")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]

logging.getLogger("ingest").addHandler(logging.NullHandler())
