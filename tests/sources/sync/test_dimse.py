"""The C-FIND SCU (``ingest.sources.sync.dimse``) against pynetdicom Study Root SCPs on loopback: over DICOM
TLS (``[[sync.sources]] tls = true``, ``ca``) with a private CA's certificate for 127.0.0.1; many queries
on one association; a tiny peer Maximum Length (every PDU fragmented both ways); a refused association;
an abort in the middle of an answer."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from tests import REPO, free_ports

STUDY = "1.2.826.0.1.3680043.10.1.77"
pytestmark = pytest.mark.slow


@pytest.fixture
def tls_pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ca = trustme.CA(organization_name="ingest test PACS CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_ports(1)[0]
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if event.identifier.QueryRetrieveLevel == "STUDY":
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = STUDY
            ds.StudyDate = "20240105"
            yield 0xFF00, ds
        yield 0x0000, None

    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port, ca_file
    finally:
        server.shutdown()


def _sync(tmp: Path, port: int, ca: Path, *, tls: bool) -> subprocess.CompletedProcess[str]:
    (tmp / "ingest.toml").write_text(
        "[sync]\nattempts = 1\ntimeout_s = 5\n[[sync.sources]]\nname = \"tls\"\n"
        f'url = "dimse://TLSPACS@127.0.0.1:{port}"\nca = "{ca}"\ntls = {"true" if tls else "false"}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    return subprocess.run(
        [sys.executable, "-m", "ingest", "--config", str(tmp / "ingest.toml"), "--data-dir", str(tmp / "d"),
         "sync", "--name", "tls", "--dry-run", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_c_find_over_tls_verified_by_the_configured_ca(tmp_path: Path, tls_pacs: tuple[int, Path]) -> None:
    port, ca = tls_pacs
    done = _sync(tmp_path, port, ca, tls=True)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stderr.splitlines()[-1])["instances"]
    assert (counts["studies"], counts["series"], counts["instances"]) == (1, 0, 0)
    # without TLS the PACS's TLS port answers nothing DICOM: the association fails, named
    plain = _sync(tmp_path, port, ca, tls=False)
    assert plain.returncode == 1
    assert "C-FIND QueryRetrieveLevel=STUDY at TLSPACS@127.0.0.1" in plain.stderr


def test_no_answer_is_lost_over_many_queries_on_one_association(tmp_path: Path) -> None:
    """Answers that follow each other as fast as the loopback allows all arrive, query after query, on one
    association (a dropped answer would be a silently missing match)."""
    from ingest.sources.sync.answers import IMAGE_KEYS, identifier
    from ingest.sources.sync.dimse import DimseFinder

    port = free_ports(1)[0]
    ae = AE(ae_title="FASTPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(3):
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.SOPInstanceUID = f"{STUDY}.{n}"
            yield 0xFF00, ds
        yield 0x0000, None

    def no_delay(event: Any) -> None:  # answers as fast as the loopback allows
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_CONN_OPEN, no_delay)])
    finder = DimseFinder("fast", f"dimse://FASTPACS@127.0.0.1:{port}", calling_ae="INGEST", timeout_s=10)
    try:
        query = identifier("IMAGE", IMAGE_KEYS, StudyInstanceUID=STUDY, SeriesInstanceUID=STUDY)
        counts = [len(finder.find(query)[0]) for _ in range(1000)]
    finally:
        finder.close()
        server.shutdown()
    assert counts == [3] * 1000


def _scp(ae_title: str, on_find: Any, **options: Any) -> tuple[Any, int]:
    port = free_ports(1)[0]
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    for key, value in options.items():
        setattr(ae, key, value)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    return server, port


def test_a_tiny_peer_maximum_length_fragments_every_pdu_both_ways() -> None:
    from ingest.sources.sync.answers import IMAGE_KEYS, identifier
    from ingest.sources.sync.dimse import DimseFinder

    asked: list[Dataset] = []
    comment = "".join(chr(0x41 + n % 26) for n in range(6000))  # one answer of ~6 KB: 24+ PDUs

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        asked.append(event.identifier)
        for n in range(3):
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.SOPInstanceUID = f"{STUDY}.{n}"
            ds.ImageComments = comment
            yield 0xFF00, ds
        yield 0x0000, None

    server, port = _scp("TINYPDU", on_find, maximum_pdu_size=256)
    finder = DimseFinder("tiny", f"dimse://TINYPDU@127.0.0.1:{port}", calling_ae="INGEST", timeout_s=10)
    try:
        query = identifier("IMAGE", IMAGE_KEYS, StudyInstanceUID=STUDY, SeriesInstanceUID=f"{STUDY}.9")
        answers, complete = finder.find(query)
        again, _ = finder.find(query)
    finally:
        finder.close()
        server.shutdown()
    assert complete and len(answers) == 3 and len(again) == 3
    assert [str(a.SOPInstanceUID) for a in answers] == [f"{STUDY}.{n}" for n in range(3)]
    assert all(str(a.ImageComments) == comment for a in answers)
    # the query arrived whole through 256-byte PDUs: every key, the matching values
    assert len(asked) == 2 and str(asked[0].SeriesInstanceUID) == f"{STUDY}.9"
    assert all(key in asked[0] for key in IMAGE_KEYS)


def test_a_refused_association_and_an_abort_mid_answer_name_the_source_and_the_query() -> None:
    from ingest.errors import SyncSourceError
    from ingest.sources.sync.answers import STUDY_KEYS, identifier
    from ingest.sources.sync.dimse import DimseFinder

    def one_then_abort(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = STUDY
        yield 0xFF00, ds
        event.assoc.abort()
        yield 0x0000, None

    picky, picky_port = _scp("PICKY", one_then_abort, require_calling_aet=["SOMEONE"])
    rude, rude_port = _scp("RUDE", one_then_abort)
    query = identifier("STUDY", STUDY_KEYS, StudyDate="20240101-20240131")
    try:
        refused = DimseFinder("picky", f"dimse://PICKY@127.0.0.1:{picky_port}", calling_ae="INGEST",
                              timeout_s=10)
        with pytest.raises(SyncSourceError, match=r"source picky: C-FIND .*StudyDate=20240101-20240131.*"
                                                  r"PICKY@127\.0\.0\.1.*association rejected"):
            refused.find(query)
        aborted = DimseFinder("rude", f"dimse://RUDE@127.0.0.1:{rude_port}", calling_ae="INGEST",
                              timeout_s=10)
        with pytest.raises(SyncSourceError, match=r"source rude: C-FIND .*QueryRetrieveLevel=STUDY"):
            aborted.find(query)
        # the next query opens a new association and is answered up to the same abort again
        with pytest.raises(SyncSourceError, match="source rude"):
            aborted.find(query)
        aborted.close()
    finally:
        picky.shutdown()
        rude.shutdown()
