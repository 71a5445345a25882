"""Synthetic DICOM samples for ``ingest``: the generator and the committed sample studies.

Nothing here is real patient data: names, identifiers, dates and pixels are invented by
:mod:`samples.generate`.
"""

from __future__ import annotations
