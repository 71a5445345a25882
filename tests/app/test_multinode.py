"""Several nodes on one PostgreSQL state store (docs/architecture.md).

Every node here is a real ``ingest`` child process; the FHIR backend is one ``ingest backend`` process
shared by all of them, and the PostgreSQL cluster is this module's own (it is restarted by one test).
Expected values come from the generated corpus (``samples.generate``), never from the code under test.
Skipped, with a message, only when no PostgreSQL binaries are installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from samples.generate import GeneratedCorpus, generate
from tests import REPO
from tests import wait_until as _wait_until
from tests.conftest import _free_port, _pg_bin

wait_until = functools.partial(_wait_until, every=0.2)  # HTTP and subprocess checks


ROOT = REPO

pytestmark = pytest.mark.timeout(180)


# -- a PostgreSQL cluster of this module's own (one test restarts it) ---------------------------------------


@dataclass
class Cluster:
    data: Path
    port: int
    run_as: list[str]
    pg_ctl: str
    base: Path

    @property
    def server_url(self) -> str:
        return f"postgresql://ingest@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), "-l", str(self.base / "log"), "-w", *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._ctl("-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} -c fsync=off", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://ingest@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: multi-node tests skipped")
    pytest.importorskip("psycopg")
    base = Path(tempfile.mkdtemp(prefix="ingest-mn-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start a PostgreSQL cluster")
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *run_as,
            initdb,
            "-D",
            str(base / "data"),
            "-U",
            "ingest",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    c = Cluster(base / "data", _free_port(), run_as, pg_ctl, base)
    c.start()
    try:
        yield c
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(
                [*run_as, pg_ctl, "-D", str(c.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


# -- child processes -----------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(
        {
            "INGEST_LOG__LEVEL": "INFO",
            "INGEST_ADMIN__ENABLED": "false",
            "INGEST_RELAY__STABLE_AGE_S": "0.5",
            "INGEST_RELAY__RELEASE_GRACE_S": "0.2",
            "INGEST_RELAY__POLL_INTERVAL_S": "0.1",
            "INGEST_RELAY__BASE_BACKOFF_S": "0.1",
            "INGEST_RELAY__MAX_BACKOFF_S": "0.5",
            "INGEST_RELAY__MAX_ATTEMPTS": "100",
        }
    )
    env.update(extra)
    return env


class Child:
    """An ``ingest`` child process with its stderr in a file (so a test can wait for a log line)."""

    def __init__(self, name: str, data_dir: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = data_dir.parent / f"{name}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--data-dir", str(data_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=ROOT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} in its log:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by its handle
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def writes(self) -> Counter[tuple[str, str]]:
        """``(study_uid, created|updated)`` -> count, from this node's relay log lines."""
        return Counter(
            (m[1], m[2]) for m in re.finditer(r"study (\S+) (created|updated) \(ImagingStudy/", self.text())
        )


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(name: str, data_dir: Path, args: Sequence[str], env: dict[str, str]) -> Child:
        started.append(Child(name, data_dir, args, env))
        return started[-1]

    yield start
    for child in reversed(started):
        child.stop()


def _backend(start: Callable[..., Child], tmp: Path, name: str = "backend") -> tuple[str, str]:
    """Start ``ingest backend --port 0``; returns (GraphQL URL, base URL)."""
    child = start(name, tmp / name, ["backend", "--port", "0"], _env())
    url = child.wait_for(r"listening on (http://127\.0\.0\.1:(\d+)/fhir/R4/\$graphql)")[1]
    return url, url.split("/fhir/", 1)[0]


# -- backend queries -----------------------------------------------------------------------------------------

_ALL = """{ ImagingStudyList(_count: 1000) {
  identifier { system value } status numberOfSeries numberOfInstances started description
  modality { system code } subject { reference display }
  series { uid number modality { code } numberOfInstances description
           instance { uid number sopClass { code } } }
} }"""


def _post(url: str, query: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    assert not body.get("errors"), body
    return body


def studies_in(url: str) -> dict[str, list[dict[str, Any]]]:
    """Study Instance UID -> every ImagingStudy carrying it (more than one would be a duplicate)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for res in _post(url, _ALL)["data"]["ImagingStudyList"] or []:
        uids = [
            i["value"].removeprefix("urn:oid:") for i in res["identifier"] if i["system"] == "urn:dicom:uid"
        ]
        assert len(uids) == 1, res["identifier"]
        out.setdefault(uids[0], []).append(res)
    return out


def stats(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as resp:
        result: dict[str, int] = json.loads(resp.read())
    return result


def instance_uids(resource: dict[str, Any]) -> set[str]:
    return {i["uid"] for s in resource.get("series") or [] for i in s.get("instance") or []}



def expected_instances(paths: Sequence[Path]) -> dict[str, set[str]]:
    import pydicom

    out: dict[str, set[str]] = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        out.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def complete(url: str, want: dict[str, set[str]]) -> bool:
    have = studies_in(url)
    return all(
        len(have.get(uid, [])) == 1 and instance_uids(have[uid][0]) == sops for uid, sops in want.items()
    )


# -- replay on several machines ------------------------------------------------------------------------------


def _normalised(resource: dict[str, Any]) -> dict[str, Any]:
    series = sorted(resource.get("series") or [], key=lambda s: s["uid"])
    for s in series:
        s["instance"] = sorted(s.get("instance") or [], key=lambda i: i["uid"])
    return {**resource, "series": series}


def test_two_replays_on_one_postgresql_equal_one_replay(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    corpus = generate(tmp_path / "corpus", studies=5, files=60, seed=61, matrix=8)
    paths = corpus.paths()
    split_study = corpus.studies[0].directory  # this study is split across both replays
    halves = (tmp_path / "half-a", tmp_path / "half-b")
    for n, path in enumerate(paths):
        rel = path.relative_to(corpus.root)
        if rel.parts[0] == split_study:
            target = halves[n % 2]
        else:
            target = halves[sorted({s.directory for s in corpus.studies}).index(rel.parts[0]) % 2]
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / rel)
    split_files = [len(list((h / split_study).rglob("*.dcm"))) for h in halves]
    assert min(split_files) > 0, split_files

    shared_url, shared_base = _backend(children, tmp_path, "backend-shared")
    ref_url, _ = _backend(children, tmp_path, "backend-ref")
    pg = cluster.new_database()

    # two replays at once, on two "machines" (data dirs), sharing PostgreSQL and the backend
    env = _env(INGEST_BACKEND__URL=shared_url, INGEST_STATE__URL=pg)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingest",
                "--data-dir",
                str(tmp_path / f"node-{i}"),
                "replay",
                str(half),
                "--jobs",
                "2",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "INGEST_STATE__NODE_ID": f"replay-{i}"},
            cwd=ROOT,
        )
        for i, half in enumerate(halves)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode(errors="replace")[-3000:]
    summaries = [json.loads(out) for out, _ in outs]
    assert sum(s["instances"]["accepted"] for s in summaries) == corpus.files

    # the same corpus in one replay, SQLite state, its own backend
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest",
            "--data-dir",
            str(tmp_path / "single"),
            "replay",
            str(corpus.root),
            "--jobs",
            "2",
            "--json",
        ],
        capture_output=True,
        env=_env(INGEST_BACKEND__URL=ref_url),
        cwd=ROOT,
        timeout=120,
    )
    assert ref.returncode == 0, ref.stderr.decode(errors="replace")[-3000:]

    multi, single = studies_in(shared_url), studies_in(ref_url)
    assert sorted(multi) == sorted(single) == sorted(corpus.study_uids)
    assert all(len(found) == 1 for found in multi.values()), "a study was written twice"
    for study in corpus.studies:
        res = multi[study.study_uid][0]
        assert (res["numberOfSeries"], res["numberOfInstances"]) == corpus.expected[study.study_uid]
        assert _normalised(res) == _normalised(single[study.study_uid][0])
    # the split study: one resource holding the union of both halves
    want = expected_instances(
        sorted((tmp_path / "half-a" / split_study).rglob("*.dcm"))
        + sorted((tmp_path / "half-b" / split_study).rglob("*.dcm"))
    )
    ((uid, sops),) = want.items()
    assert instance_uids(multi[uid][0]) == sops
    counters = stats(shared_base)
    assert counters["creates"] == len(corpus.studies)


# -- several ``ingest serve`` nodes ------------------------------------------------------------


def _serve(
    start: Callable[..., Child], tmp: Path, name: str, *, pg: str, backend_url: str, **extra: str
) -> tuple[Child, int]:
    env = _env(
        INGEST_STATE__URL=pg,
        INGEST_STATE__NODE_ID=name,
        INGEST_BACKEND__URL=backend_url,
        INGEST_LISTENER__PORT="0",
        INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
        **extra,
    )
    child = start(name, tmp / name, ["serve"], env)
    port = int(child.wait_for(r"DICOM listener \S+ on 127\.0\.0\.1:(\d+)")[1])
    child.wait_for(r"ingest serve running")
    return child, port


def _storescu(port: int, files: Sequence[Path]) -> subprocess.Popen[bytes]:
    exe = shutil.which("storescu")
    assert exe is not None
    return subprocess.Popen(
        [exe, "-aet", "MODALITY", "-aec", "INGEST", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _sent(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]


needs_storescu = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")


@needs_storescu
def test_two_serve_nodes_one_writer_per_study(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    url, base = _backend(children, tmp_path)
    pg = cluster.new_database()
    a, port_a = _serve(children, tmp_path, "node-a", pg=pg, backend_url=url)
    b, port_b = _serve(children, tmp_path, "node-b", pg=pg, backend_url=url)

    # one study, half sent to each node at the same time
    one = generate(tmp_path / "one", studies=1, files=16, seed=62, matrix=8)
    files = one.paths()
    _sent([_storescu(port_a, files[0::2]), _storescu(port_b, files[1::2])])
    want = expected_instances(files)
    wait_until(lambda: complete(url, want), 30, "the split study with all its instances")

    # 20 studies over both nodes
    many = generate(tmp_path / "many", studies=20, files=40, seed=63, tiny=True)
    dirs = sorted({p.relative_to(many.root).parts[0] for p in many.paths()})
    to_a = [p for p in many.paths() if dirs.index(p.relative_to(many.root).parts[0]) % 2 == 0]
    to_b = [p for p in many.paths() if dirs.index(p.relative_to(many.root).parts[0]) % 2 == 1]
    _sent([_storescu(port_a, to_a), _storescu(port_b, to_b)])
    want_many = expected_instances(many.paths())
    assert len(want_many) == 20
    wait_until(lambda: complete(url, want_many), 60, "20 studies with all their instances")

    found = studies_in(url)
    assert len(found) == 21 and all(len(v) == 1 for v in found.values())
    # every backend write was made by exactly one node, and no study was created twice
    counters = stats(base)
    writes_a, writes_b = a.writes(), b.writes()
    assert sum(writes_a.values()) + sum(writes_b.values()) == counters["creates"] + counters["updates"]
    created = Counter(uid for (uid, kind) in (writes_a + writes_b).elements() if kind == "created")
    assert created == Counter({uid: 1 for uid in found})
    assert counters["creates"] == 21


@needs_storescu
async def test_node_killed_while_holding_leases_is_taken_over(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    from tests.faultproxy import Fault, FaultProxy, is_write

    url, base = await asyncio.to_thread(_backend, children, tmp_path)
    pg = cluster.new_database()
    proxy = FaultProxy(base)
    await proxy.start()
    try:
        # node A's backend writes hang (a stuck backend): it claims, renews, and never finishes
        proxy.arm(Fault("delay", times=100, when=is_write, seconds=120))
        a, port_a = await asyncio.to_thread(
            _serve,
            children,
            tmp_path,
            "node-a",
            pg=pg,
            backend_url=proxy.graphql_url,
            INGEST_RELAY__LEASE_S="3",
            INGEST_BACKEND__TIMEOUT_S="120",
        )
        corpus = generate(tmp_path / "corpus", studies=3, files=9, seed=64, tiny=True)
        want = expected_instances(corpus.paths())
        await asyncio.to_thread(_sent, [_storescu(port_a, corpus.paths())])

        def leases() -> dict[str, Any]:
            run = subprocess.run(
                [sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "status"), "status", "--json"],
                capture_output=True,
                env=_env(INGEST_STATE__URL=pg),
                cwd=ROOT,
                timeout=60,
            )
            assert run.returncode == 0, run.stderr.decode(errors="replace")
            result: dict[str, Any] = json.loads(run.stdout)
            return result

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(leases)
            held = [n for n in status["nodes"] if n["node"] == "node-a"]
            if held and held[0]["active_leases"] == len(want):
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"node-a never held all leases: {status}")
        # longer than the lease (3 s, renewed every 1 s; long enough that a loaded CI machine delaying one
        # renewal does not lose it): node A is renewing while its writes hang
        await asyncio.sleep(3.5)
        status = await asyncio.to_thread(leases)
        assert [(n["node"], n["active_leases"]) for n in status["nodes"]] == [("node-a", len(want))]
        assert all(s["lease_owner"] == "node-a" and s["lease_active"] for s in status["studies"])

        a.kill()
        await proxy.close()  # its hanging requests die with it: nothing reaches the backend late
        b, _ = await asyncio.to_thread(
            _serve,
            children,
            tmp_path,
            "node-b",
            pg=pg,
            backend_url=url,
            INGEST_RELAY__LEASE_S="3",
        )
        await asyncio.to_thread(wait_until, lambda: complete(url, want), 30, "node B finishing A's studies")
    finally:
        await proxy.close()
    assert stats(base)["creates"] == len(want)
    assert {uid for uid, kind in b.writes() if kind == "created"} == set(want)
    assert a.writes() == Counter()


def test_postgresql_restart_answers_a700_then_recovers(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    url, _ = _backend(children, tmp_path)
    pg = cluster.new_database()
    _, port = _serve(children, tmp_path, "node-a", pg=pg, backend_url=url)
    corpus: GeneratedCorpus = generate(tmp_path / "corpus", studies=1, files=6, seed=65, tiny=True)
    datasets = [dcmread(p) for p in corpus.paths()]

    def send(ds: Any) -> int:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
            return int(status.Status)
        finally:
            assoc.release()

    assert [send(ds) for ds in datasets[:2]] == [0x0000, 0x0000]
    cluster.stop()
    try:
        assert send(datasets[2]) == 0xA700  # state store down: out of resources, nothing kept
        assert send(datasets[3]) == 0xA700
    finally:
        cluster.start()
    # no restart of the node: the store reconnects by itself
    assert [send(ds) for ds in datasets[2:]] == [0x0000] * 4
    want = expected_instances(corpus.paths())
    wait_until(lambda: complete(url, want), 30, "the study with every instance after the restart")


# -- in process: lease renewal during a long write, and what a lost lease may record ------------


class _SlowSink:
    """A backend whose create takes ``seconds``; ``during_create`` runs as the write starts."""

    def __init__(self, seconds: float, during_create: Callable[[], None] = lambda: None) -> None:
        self.seconds = seconds
        self.during_create = during_create
        self.creates = 0

    async def find(self, study_uid: str, backend_id: str | None) -> Any:
        return None

    async def create(self, resource: dict[str, Any]) -> Any:
        from ingest.ports import BackendStudy

        self.during_create()
        await asyncio.sleep(self.seconds)
        self.creates += 1
        return BackendStudy(id="is-1", version_id="1", resource=resource)

    async def update(self, backend_id: str, resource: dict[str, Any]) -> Any:
        raise AssertionError("no update expected")

    async def aclose(self) -> None:
        return None


def _one_study_store(tmp_path: Path) -> Any:
    from datetime import UTC, datetime

    from ingest.adapters.state.sqlite import SQLiteStateStore
    from ingest.core.records import InstanceRecord

    store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    now = datetime.now(UTC)
    record = InstanceRecord(
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid="1.2.3.4.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
    )
    store.add_instance(record, source="test", spool_name=None, digest="d", now=now, due_at=now)
    return store


def _relay(store: Any, sink: Any, lease_s: float) -> Any:
    from ingest.config import Settings
    from ingest.relay.relay import Relay

    settings = Settings(relay={"lease_s": lease_s, "concurrency": 1})  # type: ignore[arg-type]
    return Relay(
        store,
        sink,
        lambda records: {"resourceType": "ImagingStudy", "status": "available"},
        settings.relay,
        node="node-a",
    )


async def test_a_write_longer_than_the_lease_keeps_it_by_renewal(tmp_path: Path) -> None:
    from ingest.ports import StudyState

    store = _one_study_store(tmp_path)
    try:
        # 2.5 lease lengths; a lease of 1 s (renewed every 1/3 s) so that a loaded machine delaying one
        # renewal thread does not lose it
        sink = _SlowSink(2.5)
        relay = _relay(store, sink, lease_s=1.0)
        assert await relay.run_once() == 1
        row = store.study("1.2.3")
        assert (row.state, row.dirty, row.backend_id, row.lease_owner) == (
            StudyState.PUSHED,
            False,
            "is-1",
            None,
        )
        assert relay.totals.results == Counter({"created": 1})
    finally:
        store.close()


async def test_a_lost_lease_records_nothing(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from ingest.ports import StudyState

    store = _one_study_store(tmp_path)
    try:
        stolen: list[Any] = []

        def steal() -> None:  # another node, whose clock is past node A's lease, takes the study over
            later = datetime.now(UTC) + timedelta(seconds=5)
            stolen.extend(store.claim_due(later, 5, "node-b", 60))

        sink = _SlowSink(0.5, during_create=steal)
        relay = _relay(store, sink, lease_s=0.3)
        assert await relay.run_once() == 1
        assert [c.owner for c in stolen] == ["node-b"]
        assert sink.creates == 1  # the write happened, but node A must not record it as the owner
        row = store.study("1.2.3")
        assert (row.state, row.dirty, row.backend_id, row.lease_owner) == (
            StudyState.PENDING,
            True,
            None,
            "node-b",
        )
        assert relay.totals.results == Counter({"lease_lost": 1})
    finally:
        store.close()


def _shard_of(relative: str, count: int) -> int:
    """The shard (1-based) ``--shard K/N`` gives a file, as README.md states it: BLAKE2b (8 bytes,
    big-endian) of the path relative to the argument, modulo N."""
    digest = hashlib.blake2b(relative.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count + 1


def test_two_shards_on_one_postgresql_equal_one_replay(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    corpus = generate(tmp_path / "corpus", studies=5, files=60, seed=67, matrix=8)
    by_shard: dict[int, Counter[str]] = {1: Counter(), 2: Counter()}
    for path in corpus.paths():
        study_dir = path.relative_to(corpus.root).parts[0]
        by_shard[_shard_of(path.relative_to(corpus.root).as_posix(), 2)][study_dir] += 1
    split = set(by_shard[1]) & set(by_shard[2])
    assert split, "no study has files in both shards: choose another seed"

    shared_url, shared_base = _backend(children, tmp_path, "backend-shared")
    ref_url, _ = _backend(children, tmp_path, "backend-ref")
    pg = cluster.new_database()
    env = _env(INGEST_BACKEND__URL=shared_url, INGEST_STATE__URL=pg)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / f"node-{k}"), "replay",
             str(corpus.root), "--shard", f"{k}/2", "--jobs", "2", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**env, "INGEST_STATE__NODE_ID": f"shard-{k}"}, cwd=ROOT,
        )
        for k in (1, 2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode(errors="replace")[-3000:]
    summaries = [json.loads(out) for out, _ in outs]
    for k, summary in zip((1, 2), summaries, strict=True):  # each shard read only its own files
        assert summary["files"] == summary["instances"]["accepted"] == sum(by_shard[k].values())

    ref = subprocess.run(
        [sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "single"), "replay", str(corpus.root),
         "--jobs", "2", "--json"],
        capture_output=True, env=_env(INGEST_BACKEND__URL=ref_url), cwd=ROOT, timeout=120,
    )
    assert ref.returncode == 0, ref.stderr.decode(errors="replace")[-3000:]

    sharded, single = studies_in(shared_url), studies_in(ref_url)
    assert sorted(sharded) == sorted(single) == sorted(corpus.study_uids)
    assert all(len(found) == 1 for found in sharded.values()), "a study was written twice"
    for study in corpus.studies:
        res = sharded[study.study_uid][0]
        assert (res["numberOfSeries"], res["numberOfInstances"]) == corpus.expected[study.study_uid]
        assert _normalised(res) == _normalised(single[study.study_uid][0])
    assert stats(shared_base)["creates"] == len(corpus.studies)
