"""ImagingStudy.text through Medplum's own FHIR GraphQL implementation (``server.mjs``).

Medplum accepts and stores the generated narrative and gives the ``div`` back byte for byte, so the
ownership marker survives a round trip and an unchanged re-push writes nothing; a narrative someone else
writes through Medplum is kept by the next push (docs/mapping.md, "Narrative"). Medplum's validator does
not look inside the XHTML (its FHIRPath ``htmlChecks()`` always answers true), so the div read back is
checked here with an XML parser. The GraphQL sink and :func:`ingest.core.merge.plan` are driven directly
with ``narrative=True``, as ``[mapping] narrative = true`` passes it.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import Any

from ingest.adapters.graphql import GraphQLSink
from ingest.core.aggregate import aggregate
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.merge import Create, NoChange, Update, plan
from ingest.core.narrative import XHTML_NS, is_ingest_narrative
from ingest.core.records import InstanceRecord
from tests.faultproxy import gql

CT = "1.2.840.10008.5.1.4.1.1.2"
DESCRIPTION = 'Thorax & Abdomen "CT" 胸部 <script>alert(1)</script>'
UPDATE = """mutation($id: ID!, $res: ImagingStudyCreate!) {
  ImagingStudyUpdate(id: $id, res: $res) { id meta { versionId } }
}"""


def ours(study_uid: str, instances: int) -> dict[str, Any]:
    records = [
        InstanceRecord(
            study_uid=study_uid,
            series_uid=f"{study_uid}.1",
            sop_uid=f"{study_uid}.1.{n}",
            sop_class_uid=CT,
            modality="CT",
            patient_id="PID-INTEROP",
            study_date="20240115",
            study_time="083000",
            study_description=DESCRIPTION,
            series_number=1,
            body_part="CHEST",
        )
        for n in range(1, instances + 1)
    ]
    study, _ = build_imaging_study(aggregate(records), MappingOptions())
    return study.to_fhir()


def description_cell(div: str) -> str:
    root = ET.fromstring(div)
    assert root.tag == f"{{{XHTML_NS}}}div"
    for row in root.iter(f"{{{XHTML_NS}}}tr"):
        th, td = row.find(f"{{{XHTML_NS}}}th"), row.find(f"{{{XHTML_NS}}}td")
        if th is not None and td is not None and th.text == "Description":
            return "".join(td.itertext())
    raise AssertionError("no Description row")


async def test_narrative_round_trip_and_ownership_on_medplum(medplum_url: str) -> None:
    study_uid = f"2.25.{uuid.uuid4().int}"
    async with GraphQLSink(medplum_url, token_source=None, timeout_s=10) as sink:
        assert await sink.find(study_uid, None) is None
        created = plan(ours(study_uid, 2), None, narrative=True)
        assert isinstance(created, Create)
        written = await sink.create(created.resource)

        # stored as sent: the marker survives, the value comes back exactly, nothing to write again
        found = await sink.find(study_uid, written.id)
        assert found is not None
        assert found.resource["text"] == created.resource["text"]
        assert is_ingest_narrative(found.resource["text"])
        assert description_cell(found.resource["text"]["div"]) == DESCRIPTION
        assert plan(ours(study_uid, 2), found, narrative=True) == NoChange(found.id, found.version_id)

        # a new instance: an update whose narrative is recomputed and accepted
        grown = plan(ours(study_uid, 3), found, narrative=True)
        assert isinstance(grown, Update)
        await sink.update(grown.backend_id, grown.resource)
        found = await sink.find(study_uid, written.id)
        assert found is not None and found.resource["text"] == grown.resource["text"]
        assert ">3</td></tr></tbody></table></div>" in found.resource["text"]["div"]

        # someone else writes their own narrative; the next push keeps it
        theirs = {"status": "additional", "div": f'<div xmlns="{XHTML_NS}"><p>Reviewed by QA</p></div>'}
        edited = {k: v for k, v in found.resource.items() if k != "meta"} | {"text": theirs}
        answer = await gql(medplum_url, UPDATE, {"id": found.id, "res": edited})
        assert not answer.get("errors"), answer
        found = await sink.find(study_uid, written.id)
        assert found is not None
        again = plan(ours(study_uid, 4), found, narrative=True)
        assert isinstance(again, Update) and again.resource["text"] == theirs
        await sink.update(again.backend_id, again.resource)
        found = await sink.find(study_uid, written.id)
        assert found is not None and found.resource["text"] == theirs
        assert found.resource["numberOfInstances"] == 4
