"""The state store's schema, written once: numbered migrations as DDL templates that each dialect fills
with its column types (:func:`migrations`).

``migrations(dialect)[i]`` brings a store's schema version from ``i`` to ``i + 1``; SQLite keeps the
version in ``PRAGMA user_version``, PostgreSQL in ``ingest_schema.version``. Instants are SQLite
fixed-width UTC ISO strings and PostgreSQL ``timestamptz``; booleans SQLite integers 1 / 0 and PostgreSQL
``boolean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["POSTGRES", "SQLITE", "Dialect", "migrations"]


@dataclass(frozen=True)
class Dialect:
    """A dialect's column types, and the statements only it runs (step -> appended statements)."""

    text: str
    ts: str
    integer: str
    bigint: str
    boolean: str
    false: str
    blob: str
    extra: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


SQLITE: Final = Dialect(
    text="TEXT", ts="TEXT", integer="INTEGER", bigint="INTEGER", boolean="INTEGER", false="0", blob="BLOB",
    # an index on the state alone, which SQLite stores have had from their first version
    extra={0: ("CREATE INDEX studies_state ON studies (state)",)},
)
POSTGRES: Final = Dialect(
    text="text", ts="timestamptz", integer="integer", bigint="bigint", boolean="boolean", false="false",
    blob="bytea",
)

_STEPS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE instances (
            sop_uid     {text} PRIMARY KEY,         -- (0008,0018)
            study_uid   {text} NOT NULL,            -- (0020,000D)
            series_uid  {text} NOT NULL,            -- (0020,000E)
            digest      {text} NOT NULL,
            source      {text} NOT NULL,
            spool_name  {text},
            node        {text},
            record_json {text} NOT NULL,
            added_at    {ts} NOT NULL
        )
        """,
        "CREATE INDEX instances_study ON instances (study_uid)",
        """
        CREATE TABLE studies (
            study_uid       {text} PRIMARY KEY,     -- (0020,000D)
            generation      {bigint} NOT NULL DEFAULT 0,
            dirty           {bool} NOT NULL DEFAULT {false},
            last_seen       {ts},
            due_at          {ts},
            state           {text} NOT NULL DEFAULT 'pending',
            backend_id      {text},
            version_id      {text},
            digest          {text},
            attempts        {int} NOT NULL DEFAULT 0,
            next_attempt_at {ts},
            last_error      {text},
            dead_reason     {text},
            pushed_at       {ts},
            lease_owner     {text},
            lease_expires   {ts}
        )
        """,
        # claim_due: pending + dirty studies in due order
        "CREATE INDEX studies_due ON studies (state, dirty, due_at)",
    ),
    # 2: the start-up sweep looks spool names up (sweep_orphans)
    ("CREATE INDEX instances_spool ON instances (spool_name)",),
    # 3: study lifecycle: rejections (IOCM) and replaced instances (ingest.adapters.state.lifecycle);
    # "" in series_uid / sop_uid widens a rejection to the whole study / series, note_uid "" is
    # `ingest reject`'s
    (
        """
        CREATE TABLE rejections (
            study_uid  {text} NOT NULL,           -- (0020,000D)
            series_uid {text} NOT NULL DEFAULT '', -- (0020,000E)
            sop_uid    {text} NOT NULL DEFAULT '', -- (0008,0018)
            code       {text} NOT NULL,           -- DCM code value (113001, 113037, 113038, 113039)
            note_uid   {text} NOT NULL DEFAULT '', -- the rejection note's SOP Instance UID
            added_at   {ts} NOT NULL,
            PRIMARY KEY (study_uid, series_uid, sop_uid, code, note_uid)
        )
        """,
        "ALTER TABLE instances ADD COLUMN replaced_at {ts}",
    ),
    # 4: what ingest last wrote (ingest.relay): the ImagingStudy the mapping built for that write, and
    # the subject the written resource carried (the merge's "ours before", the subject guard)
    (
        "ALTER TABLE studies ADD COLUMN written_ours text",
        "ALTER TABLE studies ADD COLUMN written_subject text",
    ),
    # 5: Storage Commitment requests and reports (ingest.adapters.state.commitments)
    (
        """
        CREATE TABLE commitments (
            transaction_uid {text} PRIMARY KEY,     -- (0008,1195)
            calling_ae      {text} NOT NULL,
            node            {text},
            state           {text} NOT NULL DEFAULT 'pending',
            received_at     {ts} NOT NULL,
            decided_at      {ts},
            attempts        {int} NOT NULL DEFAULT 0,
            next_attempt_at {ts},
            last_error      {text},
            reported_at     {ts},
            lease_owner     {text},
            lease_expires   {ts}
        )
        """,
        "CREATE INDEX commitments_due ON commitments (state, next_attempt_at)",
        """
        CREATE TABLE commitment_items (
            transaction_uid {text} NOT NULL,        -- commitments.transaction_uid
            position        {int} NOT NULL,
            sop_class_uid   {text} NOT NULL,        -- (0008,1150)
            sop_uid         {text} NOT NULL,        -- (0008,1155)
            committed       {bool},              -- NULL until decided
            failure_reason  {int},              -- (0008,1197) when not committed
            PRIMARY KEY (transaction_uid, position)
        )
        """,
    ),
    # 6: spool retention: when an instance's bytes were removed (and why), and until when a Storage
    # Commitment holds them (ingest.adapters.state.retention)
    (
        "ALTER TABLE instances ADD COLUMN bytes_removed_at {ts}",
        "ALTER TABLE instances ADD COLUMN bytes_removed_reason text",
        "ALTER TABLE instances ADD COLUMN hold_until {ts}",
        # releasable(): the instances of a pushed study whose bytes are still held
        "CREATE INDEX instances_held ON instances (study_uid) WHERE bytes_removed_at IS NULL",
    ),
    # 7: small instances' bytes, committed in the same transaction as their row (spool_name NULL)
    (
        """
        CREATE TABLE instance_bytes (
            sop_uid {text} PRIMARY KEY,   -- instances.sop_uid
            data    {bytes} NOT NULL      -- the Part 10 file
        )
        """,
    ),
    # 8: replay's file identities (path, size, mtime, digest) for unchanged reruns
    # (ingest.adapters.state.files)
    (
        """
        CREATE TABLE replay_files (
            path      {text} PRIMARY KEY,   -- absolute path of the file replay read
            size      {bigint} NOT NULL,      -- os.stat before reading: st_size
            mtime_ns  {bigint} NOT NULL,      -- and st_mtime_ns
            digest    {text} NOT NULL,      -- instances.digest of the instance it carried
            sop_uid   {text} NOT NULL,
            study_uid {text} NOT NULL
        )
        """,
    ),
    # 9: ingest sync: per source its watermark, last run and lease, and what it listed last
    # (ingest.adapters.state.sync)
    (
        """
        CREATE TABLE sync_sources (
            source        {text} PRIMARY KEY,   -- [[sync.sources]] name (or the --from URL's)
            watermark     {text},               -- YYYYMMDD: Study Date an incremental run starts from
            last_started  {ts},
            last_finished {ts},
            last_status   {text},
            last_error    {text},
            last_counts   {text},               -- JSON
            lease_owner   {text},
            lease_expires {ts}
        )
        """,
        """
        CREATE TABLE sync_studies (
            source     {text} NOT NULL,
            study_uid  {text} NOT NULL,         -- (0020,000D)
            study_date {text},                  -- (0008,0020) as listed
            PRIMARY KEY (source, study_uid)
        )
        """,
        """
        CREATE TABLE sync_listed (
            source     {text} NOT NULL,
            study_uid  {text} NOT NULL,         -- (0020,000D)
            series_uid {text} NOT NULL,         -- (0020,000E)
            sop_uid    {text} NOT NULL,         -- (0008,0018)
            PRIMARY KEY (source, study_uid, sop_uid)
        )
        """,
    ),
)


def migrations(dialect: Dialect) -> tuple[tuple[str, ...], ...]:
    """The numbered migrations in ``dialect``'s types."""
    types = {
        "text": dialect.text, "ts": dialect.ts, "int": dialect.integer, "bigint": dialect.bigint,
        "bool": dialect.boolean, "false": dialect.false, "bytes": dialect.blob,
    }
    return tuple(
        tuple(sql.format(**types) for sql in step) + dialect.extra.get(number, ())
        for number, step in enumerate(_STEPS)
    )
