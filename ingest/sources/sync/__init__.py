"""``ingest sync``: ImagingStudy resources for the studies a PACS holds, from its C-FIND (``dimse``) or
QIDO-RS (``dicomweb``) answers, without moving a pixel (docs/architecture.md "Sync").

``plan`` splits study-date windows (pure), ``answers`` turns query answers into the core's records,
``dimse`` / ``dicomweb`` ask the PACS, ``run`` is one run over a source: query, admit, reconcile.
"""
