"""The QIDO-RS client of ``ingest sync --from http(s)://.../dicom-web`` (``dicomweb-client``).

Study-level searches ask for at most ``[sync] query_limit`` matches (``limit``): an answer of that many
is taken as cut short and its window split (``ingest.sources.sync.plan``). Series and instance searches
page through every match (``offset``). The bearer token (a source's ``token_env`` or ``token_file``) is
only ever sent as an ``Authorization`` header; ``ca`` replaces the system CA store for the connection.
A search that fails (HTTP error status, no connection, timeout, an answer that is not DICOM JSON)
raises :class:`~ingest.errors.SyncSourceError` naming the source and the search. Never WADO-RS: no
retrieve is ever made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ingest.errors import SyncSourceError
from ingest.logs import printable

__all__ = ["DicomwebFinder"]

LOGGER = logging.getLogger(__name__)


class DicomwebFinder:
    """QIDO-RS searches at study, series and instance level against one DICOMweb root."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        token: str | None = None,
        ca: Path | None = None,
    ) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.name = name
        self.url = url.rstrip("/")
        session = requests.Session()
        session.trust_env = False  # no proxy or netrc credentials from the environment
        if ca is not None:
            session.verify = str(ca)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = DICOMwebClient(self.url, session=session, headers=headers, timeout=timeout_s)
        self._client.set_http_retry_params(retry=False)  # the run retries, with its own backoff
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # one INFO line per search

    def where(self) -> str:
        return printable(self.url)

    def ask(self, level: str, keys: tuple[str, ...], matching: dict[str, str], limit: int | None
            ) -> tuple[list[Dataset], bool]:
        """:class:`~ingest.sources.sync.run.Finder`: one :meth:`search`."""
        return self.search(level, keys, matching, limit=limit)

    def search(self, level: str, fields: tuple[str, ...], filters: dict[str, str], *,
               limit: int | None = None) -> tuple[list[Dataset], bool]:
        """One search: (the matches, whether the answer was complete: fewer than ``limit``)."""
        import requests

        shown = printable(" ".join(f"{k}={v}" for k, v in sorted(filters.items())))
        what = f"source {self.name}: QIDO-RS {level} {shown} at {self.where()}"
        calls: dict[str, Callable[..., list[dict[str, Any]]]] = {
            "STUDY": self._client.search_for_studies,
            "SERIES": self._client.search_for_series,
            "IMAGE": self._client.search_for_instances,
        }
        call = calls[level]
        params: dict[str, Any] = {"fields": list(fields)}
        filters = dict(filters)
        if level != "STUDY":
            params["study_instance_uid"] = filters.pop("StudyInstanceUID")
        if level == "IMAGE":
            params["series_instance_uid"] = filters.pop("SeriesInstanceUID")
        if filters:
            params["search_filters"] = filters
        if limit is None:
            params["get_remaining"] = True
        else:
            params["limit"] = limit
        try:
            found = call(**params)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise SyncSourceError(f"{what}: HTTP {code}") from exc
        except (requests.RequestException, OSError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise SyncSourceError(f"{what}: {printable(why)}") from exc
        try:
            answers = [Dataset.from_json(item) for item in found]
        except (ValueError, TypeError, KeyError) as exc:
            why = printable(str(exc)[:300])
            raise SyncSourceError(f"{what}: the answer is not DICOM JSON: {why}") from exc
        complete = limit is None or len(answers) < limit
        return answers, complete

    def close(self) -> None:
        self._client._session.close()
