"""The study lifecycle end to end against the embedded FHIR GraphQL backend: IOCM rejection notes,
``ingest reject``, ``[intake] on_conflict = "replace"`` and ``ingest status``, each through the real
command line (``python -m ingest``) as a child process (tests/faultproxy.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import iocm
from tests.faultproxy import ingest_env, run_ingest, running_backend, studies_with_identifier

GRAPHQL = "/fhir/R4/$graphql"


def _study(root: Path, study: str, series: list[str], per_series: int = 2) -> dict[str, list[str]]:
    """Write ``per_series`` CT images per series under ``root``; their SOP Instance UIDs by series."""
    made: dict[str, list[str]] = {}
    for n, se in enumerate(series, start=1):
        for i in range(1, per_series + 1):
            sop = f"{se}.{i}"
            iocm.write(root, f"s{n}-{i}.dcm", iocm.image(study, se, sop, number=i, series_number=n))
            made.setdefault(se, []).append(sop)
    return made


def _listed(resource: dict[str, Any]) -> dict[str, list[str]]:
    return {s["uid"]: sorted(i["uid"] for i in s.get("instance") or []) for s in resource.get("series") or []}


class Run:
    def __init__(self, tmp_path: Path, base: str, **env: str) -> None:
        self.tmp_path, self.url = tmp_path, base + GRAPHQL
        self.env = ingest_env(self.url)
        self.env.update(env)

    async def __call__(self, *args: str, check: bool = True) -> Any:
        done = await run_ingest(self.tmp_path / "data", *args, env=self.env, cwd=self.tmp_path)
        assert not check or done.returncode == 0, done.stderr
        return done

    async def replay(self, folder: Path) -> Any:
        return (await self("replay", str(folder), "--jobs", "1", "--json")).json()

    async def one(self, study: str) -> dict[str, Any]:
        (resource,) = await studies_with_identifier(self.url, study)
        return resource


async def test_a_note_rejecting_two_instances_of_a_pushed_study_and_again(tmp_path: Path) -> None:
    study = iocm.uid()
    s1, s2 = f"{study}.1", f"{study}.2"
    made = _study(tmp_path / "images", study, [s1, s2])
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "images")
        first = await run.one(study)
        assert first["numberOfInstances"] == 4
        # reject one instance of series 1 and both of series 2, which is then left empty
        rejecting = iocm.note(study, [(s1, made[s1][0]), (s2, made[s2][0]), (s2, made[s2][1])])
        iocm.write(tmp_path / "note", "note.dcm", rejecting)
        summary = await run.replay(tmp_path / "note")
        assert summary["studies"]["updated"] == 1
        after = await run.one(study)
        assert _listed(after) == {s1: [made[s1][1]]}  # the note itself is never listed
        assert (after["numberOfSeries"], after["numberOfInstances"], after["status"]) == (1, 1, "available")
        assert after["meta"]["versionId"] != first["meta"]["versionId"]
        # the same note again: a duplicate, no new version
        again = await run.replay(tmp_path / "note")
        assert again["instances"]["duplicate"] == 1
        assert (await run.one(study))["meta"]["versionId"] == after["meta"]["versionId"]
        status = (await run("status", "--json")).json()
        (row,) = [r for r in status["studies"] if r["study_uid"] == study]
        assert row["rejected"] == {"113001": 3}


async def test_a_whole_study_rejected_for_a_worklist_error_is_entered_in_error(tmp_path: Path) -> None:
    study = iocm.uid()
    s1 = f"{study}.1"
    made = _study(tmp_path / "images", study, [s1])
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "images")
        iocm.write(tmp_path / "note", "n.dcm", iocm.note(study, [(s1, u) for u in made[s1]], code="113038"))
        await run.replay(tmp_path / "note")
        after = await run.one(study)
        assert after["status"] == "entered-in-error"
        assert not after.get("series") and (after["numberOfSeries"], after["numberOfInstances"]) == (0, 0)


async def test_a_note_before_its_instances_keeps_them_out(tmp_path: Path) -> None:
    study = iocm.uid()
    s1 = f"{study}.1"
    iocm.write(tmp_path / "note", "n.dcm", iocm.note(study, [(s1, f"{s1}.1")]))
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "note")
        assert await studies_with_identifier(run.url, study) == []  # nothing to list yet: nothing written
        made = _study(tmp_path / "images", study, [s1], per_series=3)
        await run.replay(tmp_path / "images")
        assert _listed(await run.one(study)) == {s1: made[s1][1:]}


async def test_a_kos_of_interest_is_an_ordinary_instance(tmp_path: Path) -> None:
    study = iocm.uid()
    s1, ko = f"{study}.1", f"{study}.9"
    made = _study(tmp_path / "images", study, [s1], per_series=1)
    iocm.write(tmp_path / "images", "ko.dcm",
               iocm.note(study, [(s1, made[s1][0])], code="113000", series=ko, sop=f"{ko}.1"))
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "images")
        assert _listed(await run.one(study)) == {s1: made[s1], ko: [f"{ko}.1"]}


async def test_ingest_reject_a_series_now_and_later_arrivals(tmp_path: Path) -> None:
    study = iocm.uid()
    s1, s2 = f"{study}.1", f"{study}.2"
    made = _study(tmp_path / "images", study, [s1, s2], per_series=1)
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "images")
        done = await run("reject", "--study", study, "--series", s2, "--code", "113001", "--now")
        assert "rejected series" in done.stdout
        assert _listed(await run.one(study)) == {s1: made[s1]}
        # a later instance of the rejected series stays out
        iocm.write(tmp_path / "late", "l.dcm", iocm.image(study, s2, f"{s2}.7", number=7, series_number=2))
        await run.replay(tmp_path / "late")
        assert _listed(await run.one(study)) == {s1: made[s1]}
        again = await run("reject", "--study", study, "--series", s2, "--code", "113001")
        assert "nothing changed" in again.stdout


async def test_ingest_reject_refuses_a_bad_uid_and_code(tmp_path: Path) -> None:
    env = ingest_env(None)
    bad = await run_ingest(tmp_path / "data", "reject", "--study", "1.02.3", "--code", "113001", env=env,
                           cwd=tmp_path)
    assert bad.returncode == 1 and "--study 1.02.3 is not a valid DICOM UID" in bad.stderr
    code = await run_ingest(tmp_path / "data", "reject", "--study", "1.2.3", "--code", "113000", env=env,
                            cwd=tmp_path)
    assert code.returncode == 1 and "--code 113000 is not a rejection code" in code.stderr


async def test_ingest_reject_a_typo_then_list_and_undo(tmp_path: Path) -> None:
    import json

    study = iocm.uid()
    s1 = f"{study}.1"
    made = _study(tmp_path / "images", study, [s1], per_series=2)
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base)
        await run.replay(tmp_path / "images")
        typo = await run("reject", "--study", study + "1", "--code", "113001", check=False)
        assert typo.returncode == 1 and f"study {study}1 is not in the state store" in typo.stderr
        gone = made[s1][0]
        await run("reject", "--study", study, "--instance", gone, "--code", "113001", "--now")
        assert _listed(await run.one(study)) == {s1: made[s1][1:]}
        listed = json.loads((await run("rejections", "--study", study, "--json")).stdout)["rejections"]
        assert [(r["sop_uid"], r["code"], r["source"]) for r in listed] == [(gone, "113001", "ingest reject")]
        undone = await run("reject", "--undo", "--study", study, "--instance", gone, "--code", "113001",
                           "--now")
        assert "removed the rejection" in undone.stdout
        assert _listed(await run.one(study)) == {s1: made[s1]}
        assert "no rejections recorded" in (await run("rejections")).stdout


async def test_replace_writes_the_corrected_description_and_accession(tmp_path: Path) -> None:
    study = iocm.uid()
    s1 = f"{study}.1"
    iocm.write(tmp_path / "v1", "a.dcm", iocm.image(study, s1, f"{s1}.1", StudyDescription="Wrong side",
                                                     AccessionNumber="ACC-1"))
    iocm.write(tmp_path / "v2", "a.dcm", iocm.image(study, s1, f"{s1}.1", StudyDescription="Left knee",
                                                     AccessionNumber="ACC-2"))
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        run = Run(tmp_path, base, INGEST_INTAKE__ON_CONFLICT="replace")
        await run.replay(tmp_path / "v1")
        summary = await run.replay(tmp_path / "v2")
        assert summary["instances"]["accepted"] == 1 and summary["studies"]["updated"] == 1
        from tests.faultproxy import gql

        body = await gql(run.url, """query($id: String) { ImagingStudyList(identifier: $id) {
            description identifier { system value type { coding { code } } } numberOfInstances } }""",
                         {"id": f"urn:dicom:uid|urn:oid:{study}"})
        (resource,) = body["data"]["ImagingStudyList"]
        assert resource["description"] == "Left knee" and resource["numberOfInstances"] == 1
        accessions = [i["value"] for i in resource["identifier"]
                      if any(c["code"] == "ACSN" for c in ((i.get("type") or {}).get("coding") or []))]
        assert accessions == ["ACC-2"]
