"""IOCM rejections end to end against Medplum's own FHIR GraphQL implementation (``server.mjs``): the real
``ingest replay`` and ``ingest reject`` commands with ``INGEST_BACKEND__URL`` = Medplum, every write
validated by ``@medplum/core`` as the Medplum server does.

One run covers the scenarios of the issue, in as few commands as possible (each connection learns
Medplum's schema): a note rejecting instances of a pushed study (one series left empty), a whole study
rejected for 113038 (``entered-in-error``, no series), a note before its instances, the same note again
(no new version), a "113000 Of Interest" KOS (an ordinary instance), and ``ingest reject``. Fresh
Study Instance UIDs (``2.25.<uuid4>``) since the server is shared by the session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import iocm
from tests.faultproxy import ingest_env, run_ingest, studies_with_identifier


def _listed(resource: dict[str, Any]) -> dict[str, list[str]]:
    return {s["uid"]: sorted(i["uid"] for i in s.get("instance") or []) for s in resource.get("series") or []}


def _images(folder: Path, study: str, series: list[str], per_series: int) -> None:
    for n, se in enumerate(series, start=1):
        for i in range(1, per_series + 1):
            iocm.write(folder, f"{study[-12:]}-{n}-{i}.dcm", iocm.image(study, se, f"{se}.{i}", number=i,
                                                                         series_number=n))


async def test_rejections_on_medplum(medplum_url: str, tmp_path: Path) -> None:
    a, b, c, d = (iocm.uid() for _ in range(4))
    a1, a2, b1, c1, d1, d2, ko = f"{a}.1", f"{a}.2", f"{b}.1", f"{c}.1", f"{d}.1", f"{d}.2", f"{d}.9"
    env = ingest_env(medplum_url)

    async def replay(folder: Path) -> Any:
        done = await run_ingest(tmp_path / "data", "replay", str(folder), "--jobs", "1", "--json", env=env,
                                cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.json()

    async def one(study: str) -> dict[str, Any]:
        (resource,) = await studies_with_identifier(medplum_url, study)
        return resource

    first = tmp_path / "first"
    _images(first, a, [a1, a2], 2)
    _images(first, b, [b1], 2)
    _images(first, d, [d1, d2], 1)
    iocm.write(first, "ko.dcm", iocm.note(d, [(d1, f"{d1}.1")], code="113000", series=ko, sop=f"{ko}.1"))
    iocm.write(first, "c-note.dcm", iocm.note(c, [(c1, f"{c1}.1")], code="113001"))  # before its instances
    summary = await replay(first)
    assert summary["studies"]["created"] == 3  # a, b, d; c holds only a note: nothing to write yet
    assert await studies_with_identifier(medplum_url, c) == []
    assert _listed(await one(d)) == {d1: [f"{d1}.1"], d2: [f"{d2}.1"], ko: [f"{ko}.1"]}  # 113000: listed
    before_a = await one(a)

    second = tmp_path / "second"
    note_a = iocm.note(a, [(a1, f"{a1}.1"), (a2, f"{a2}.1"), (a2, f"{a2}.2")], code="113001")
    iocm.write(second, "a-note.dcm", note_a)
    iocm.write(second, "b-note.dcm", iocm.note(b, [(b1, f"{b1}.1"), (b1, f"{b1}.2")], code="113038"))
    _images(second, c, [c1], 2)
    await replay(second)
    after_a = await one(a)
    assert _listed(after_a) == {a1: [f"{a1}.2"]}
    assert (after_a["numberOfSeries"], after_a["numberOfInstances"]) == (1, 1)
    assert after_a["meta"]["versionId"] != before_a["meta"]["versionId"]
    after_b = await one(b)
    assert after_b["status"] == "entered-in-error"
    assert not after_b.get("series") and (after_b["numberOfSeries"], after_b["numberOfInstances"]) == (0, 0)
    assert _listed(await one(c)) == {c1: [f"{c1}.2"]}

    third = tmp_path / "third"
    iocm.write(third, "a-note.dcm", note_a)  # the same note again
    again = await replay(third)
    assert again["instances"]["duplicate"] == 1
    assert (await one(a))["meta"]["versionId"] == after_a["meta"]["versionId"]

    rejected = await run_ingest(tmp_path / "data", "reject", "--study", d, "--series", d2, "--code", "113039",
                                "--now", env=env, cwd=tmp_path, timeout=120)
    assert rejected.returncode == 0, rejected.stderr
    assert _listed(await one(d)) == {d1: [f"{d1}.1"], ko: [f"{ko}.1"]}
