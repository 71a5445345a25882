"""Storage SOP classes real senders use: retired classes, unknown classes, refused contexts.

Retired storage classes (Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6 and others, PS3.6 Annex A)
are not among pynetdicom's storage presentation contexts; ``ingest replay`` reads such files, so the
listener must accept them too. Unknown classes follow ``[listener] unknown_storage_classes``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    uid_to_service_class,
)

from ingest.sources.dimse.listener import _esc, classify_abstract_syntax, storage_sop_classes

from .listener_helpers import CT_IMAGE, instance, make_settings, running_listener, scu

US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired), PS3.6 Annex A
US_MF_RETIRED = "1.2.840.10008.5.1.4.1.1.3"  # Ultrasound Multi-frame Image Storage (Retired)
NM_RETIRED = "1.2.840.10008.5.1.4.1.1.5"  # Nuclear Medicine Image Storage (Retired)
VL_TRIAL_RETIRED = "1.2.840.10008.5.1.4.1.1.77.1"  # VL Image Storage - Trial (Retired)
XA_BIPLANE_RETIRED = "1.2.840.10008.5.1.4.1.1.12.3"  # X-Ray Angiographic Bi-Plane Image Storage
HARDCOPY_GRAY_RETIRED = "1.2.840.10008.5.1.1.29"  # Hardcopy Grayscale Image Storage (Retired)
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model: a service, not storage
MWL_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
HANGING_PROTOCOL = "1.2.840.10008.5.1.4.38.1"  # Hanging Protocol Storage: not a patient instance
PRIVATE_CLASS = "1.2.826.0.1.3680043.9.7781.1.1"  # a private storage class nobody knows
MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level: not a transfer syntax we offer

REFUSED = "ingest_presentation_contexts_refused_total"


def _with_meta(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _us(sop_uid: str = "1.2.3.6.3.1", sop_class: str = US_RETIRED) -> Dataset:
    return _with_meta(
        instance(sop_uid, study="1.2.3.6.1", series="1.2.3.6.2", SOPClassUID=sop_class, Modality="US")
    )


def _refused(metrics_text: bytes) -> dict[str, float]:
    """``reason`` label -> value of the refused-contexts counter, from the Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics_text.decode().splitlines():
        if line.startswith(REFUSED + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_storage_classes_include_retired_ones_and_exclude_services_and_non_patient() -> None:
    classes = storage_sop_classes()
    for uid in (
        US_RETIRED, US_MF_RETIRED, NM_RETIRED, VL_TRIAL_RETIRED, XA_BIPLANE_RETIRED,
        HARDCOPY_GRAY_RETIRED, DX_FOR_PRESENTATION, CT_IMAGE,
    ):
        assert uid in classes, uid
    for uid in (STORAGE_COMMITMENT, MWL_FIND, Verification, HANGING_PROTOCOL, "1.2.840.10008.1.3.10"):
        assert uid not in classes, uid


def test_classify_abstract_syntax() -> None:
    assert classify_abstract_syntax(US_RETIRED) == "storage"
    assert classify_abstract_syntax(HANGING_PROTOCOL) == "non_patient"
    assert classify_abstract_syntax(MWL_FIND) == "not_storage"
    assert classify_abstract_syntax(STORAGE_COMMITMENT) == "not_storage"
    assert classify_abstract_syntax("1.2.840.10008.5.1.4.999.1") == "not_storage"  # DICOM root, not storage
    assert classify_abstract_syntax("1.2.840.10008.5.1.4.1.1.9999.1") == "unknown"  # storage root
    assert classify_abstract_syntax(PRIVATE_CLASS) == "unknown"
    for bad in ("1.2.03.4", "1..2", "1.2.", "1.2.3a", "1", "1." + "2" * 70):
        assert classify_abstract_syntax(bad) == "invalid_uid", bad


@pytest.mark.parametrize("sop_class", [US_RETIRED, NM_RETIRED, VL_TRIAL_RETIRED, HARDCOPY_GRAY_RETIRED])
def test_pynetdicom_scu_stores_a_retired_storage_class(tmp_path: Path, sop_class: str) -> None:
    ds = _us(sop_class=sop_class)
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [sop_class]
        rsp = assoc.send_c_store(ds)
        assert getattr(rsp, "Status", None) == 0x0000
        assert assoc.is_established  # not aborted for want of a service class
        assoc.release()
        rows = run.store.instances("1.2.3.6.1")
        assert [(r.sop_uid, r.sop_class_uid) for r in rows] == [("1.2.3.6.3.1", sop_class)]
        assert _refused(run.listener.metrics.render()) == {}
    # the process-wide pynetdicom registry was not changed to get there
    assert not issubclass(uid_to_service_class(US_RETIRED), StorageServiceClass)


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
def test_dcmtk_storescu_sends_a_retired_ultrasound_file(tmp_path: Path) -> None:
    path = tmp_path / "us.dcm"
    ds = _us("1.2.3.6.3.2")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dcmwrite(path, ds, enforce_file_format=True)
    with running_listener(make_settings(tmp_path / "data", allowed_calling_aes=["STORESCU"])) as run:
        # -R: propose the files' own SOP classes (storescu's built-in list has no retired US class)
        sent = subprocess.run(
            ["storescu", "-R", "-aet", "STORESCU", "-aec", "INGEST", "127.0.0.1", str(run.port), str(path)],
            capture_output=True, text=True, timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        assert "No presentation context" not in sent.stderr + sent.stdout
        rows = run.store.instances("1.2.3.6.1")
        assert [(r.sop_uid, r.sop_class_uid) for r in rows] == [("1.2.3.6.3.2", US_RETIRED)]


def test_unknown_class_and_unoffered_transfer_syntax_are_refused_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
        ae.add_requested_context(MWL_FIND, ExplicitVRLittleEndian)
        ae.add_requested_context(US_RETIRED, MPEG2)
        with caplog.at_level(logging.WARNING, logger="ingest.sources.dimse.listener"):
            assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
            assert assoc.is_established
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CT_IMAGE]
            assert len(assoc.rejected_contexts) == 3
            assoc.release()
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(lines) == 1, lines  # one line per association
        assert "TESTSCU" in lines[0]
        assert f"{PRIVATE_CLASS} (unknown_sop_class)" in lines[0]
        assert f"{MWL_FIND} (not_storage)" in lines[0]
        assert f"{US_RETIRED} (transfer_syntax)" in lines[0]
        assert caplog.records[-1].levelno == logging.WARNING
        assert _refused(run.listener.metrics.render()) == {
            "unknown_sop_class": 1.0, "not_storage": 1.0, "transfer_syntax": 1.0,
        }


def test_log_text_is_escaped_and_bounded() -> None:
    # the calling AE title and abstract syntax UIDs come from the peer's A-ASSOCIATE-RQ
    assert _esc("EVIL\x1b[2J\r\nFORGED") == "EVIL\\x1b[2J\\r\\nFORGED"
    assert _esc("\u00c4RZT") == "\\xc4RZT"
    assert _esc("1." + "2" * 200, limit=10) == "1.22222222..."


def test_accept_mode_stores_an_unknown_class_for_that_association_only(tmp_path: Path) -> None:
    ds = _us("1.2.3.6.3.3", sop_class=PRIVATE_CLASS)
    with running_listener(make_settings(tmp_path, unknown_storage_classes="accept")) as run:
        ae = scu()
        ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
        ae.add_requested_context(MWL_FIND, ExplicitVRLittleEndian)  # still not a storage class
        ae.add_requested_context(HANGING_PROTOCOL, ExplicitVRLittleEndian)  # still not a patient one
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [PRIVATE_CLASS]
        rsp = assoc.send_c_store(ds)
        assert getattr(rsp, "Status", None) == 0x0000
        assert assoc.is_established
        assoc.release()
        rows = run.store.instances("1.2.3.6.1")
        assert [(r.sop_uid, r.sop_class_uid) for r in rows] == [("1.2.3.6.3.3", PRIVATE_CLASS)]
        assert _refused(run.listener.metrics.render()) == {"not_storage": 1.0, "non_patient": 1.0}
        # the process-wide AE was not changed
        supported = {str(cx.abstract_syntax) for cx in run.listener.supported_contexts}
        assert PRIVATE_CLASS not in supported and US_RETIRED in supported
