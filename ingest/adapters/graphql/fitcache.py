"""The documents :func:`ingest.adapters.graphql.fit.fit_schema` fitted, kept per schema fingerprint in the
data dir (``<data_dir>/graphql-fit/<fingerprint>.json``), so a second process talking to the same backend
does not validate them again (docs/architecture.md "Replay").

The fingerprint is a SHA-256 over the schema as SDL (:func:`graphql.print_schema`), the selection depth
and the text of :mod:`ingest.adapters.graphql.fit` itself: another backend schema, another depth or
another version of the fitting code is another entry. An entry holds the four document texts exactly as
``fit_schema`` built and validated them; a hit parses them (one combined parse, as ``fit_schema`` does)
but runs no validation. Anything unexpected in an entry (unreadable, not JSON, other keys, a document
that no longer parses) is a miss: the documents are fitted and validated again and the entry rewritten.
Entries are written to a temporary file and renamed, so a reader never sees half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Final

from graphql import DocumentNode, GraphQLError, GraphQLSchema, parse, print_schema

from ingest.adapters.graphql import fit as fit_module
from ingest.adapters.graphql.fit import (
    CREATE_FIELD,
    LIST_FIELD,
    UPDATE_FIELD,
    SchemaFit,  # and the fitting module's own helpers below: a hit builds what a miss would
    _input_object,
    _used_fragments,
    _used_names,
    fit_schema,
)

__all__ = ["CACHE_FOLDER", "cached_fit", "fingerprint", "use_dir"]

LOGGER = logging.getLogger(__name__)

#: The folder under the data dir holding the entries.
CACHE_FOLDER: Final = "graphql-fit"

_KEYS: Final = frozenset({"read", "search", "create", "update"})
_state: dict[str, Path | None] = {"dir": None}


def use_dir(data_dir: Path | None) -> None:
    """Keep entries under ``data_dir`` (``None``: no cache, every connect fits and validates)."""
    _state["dir"] = None if data_dir is None else data_dir / CACHE_FOLDER


@cache
def _fit_code() -> bytes:
    return hashlib.sha256(Path(fit_module.__file__).read_bytes()).digest()


def fingerprint(schema: GraphQLSchema, max_depth: int) -> str:
    """The cache key of ``schema`` fitted to ``max_depth`` by this version of the fitting code."""
    h = hashlib.sha256(_fit_code())
    h.update(f"\0{max_depth}\0".encode())
    h.update(print_schema(schema).encode())
    return h.hexdigest()


def cached_fit(schema: GraphQLSchema, *, max_depth: int) -> SchemaFit:
    """:func:`fit_schema`, from the entry for ``schema`` when the data dir holds one.

    Raises
    ------
    ConfigError
        As :func:`fit_schema` does, on a miss.
    """
    folder = _state["dir"]
    if folder is None:
        return fit_schema(schema, max_depth=max_depth)
    key = fingerprint(schema, max_depth)
    entry = folder / f"{key}.json"
    found = _load(schema, entry)
    if found is not None:
        LOGGER.debug("GraphQL documents for schema %s from the data dir", key[:12])
        return found
    fitted = fit_schema(schema, max_depth=max_depth)
    texts = {"search": fitted.search, "create": fitted.create, "update": fitted.update}
    if fitted.read is not None:
        texts["read"] = fitted.read
    try:
        _store(entry, texts)
    except OSError as exc:  # a read-only data dir costs a validation per process, nothing else
        LOGGER.warning("could not keep the fitted GraphQL documents in %s: %s", folder, exc.strerror or exc)
    return fitted


def _load(schema: GraphQLSchema, entry: Path) -> SchemaFit | None:
    try:
        texts = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(texts, dict)
        or not {"search", "create", "update"} <= texts.keys() <= _KEYS
        or not all(isinstance(v, str) for v in texts.values())
    ):
        return None
    try:
        documents = _parse_documents(texts)
    except GraphQLError:
        return None
    if documents is None:
        return None
    query, mutation = schema.query_type, schema.mutation_type
    if query is None or mutation is None or LIST_FIELD not in query.fields:
        return None
    if CREATE_FIELD not in mutation.fields or UPDATE_FIELD not in mutation.fields:
        return None
    return SchemaFit(
        schema=schema,
        read=texts.get("read"),
        search=texts["search"],
        create=texts["create"],
        update=texts["update"],
        input_type=_input_object(mutation.fields[UPDATE_FIELD], UPDATE_FIELD),
        create_input_type=_input_object(mutation.fields[CREATE_FIELD], CREATE_FIELD),
        has_count="_count" in query.fields[LIST_FIELD].args,
        documents=documents,
    )


def _parse_documents(texts: dict[str, str]) -> dict[str, DocumentNode] | None:
    """Each text (its operation, then one line per fragment it uses) as a document, from one combined
    parse; ``None`` when a text is not laid out as :func:`fit_schema` lays them out."""
    operations: dict[str, str] = {}
    fragments: dict[str, str] = {}
    for key, text in texts.items():
        head, *lines = text.split("\n")
        operations[key] = head
        for line in filter(None, lines):  # (an operation without fragments ends with an empty line)
            words = line.split(None, 2)
            if len(words) < 3 or words[0] != "fragment":
                return None
            fragments[words[1]] = line
    try:
        used = {key: _used_names(op, fragments) for key, op in operations.items()}
    except KeyError:  # a fragment the entry does not hold
        return None
    if any(text != op + "\n" + "\n".join(_used_fragments(op, fragments))
           for op, text in zip(operations.values(), texts.values(), strict=True)):
        return None
    names = sorted(set().union(*used.values()))
    combined = parse("\n".join([*operations.values(), *(fragments[n] for n in names)]))
    definitions = list(combined.definitions)
    by_op = dict(zip(operations, definitions[: len(operations)], strict=True))
    by_name = dict(zip(names, definitions[len(operations) :], strict=True))
    return {
        key: DocumentNode(definitions=(by_op[key], *(by_name[n] for n in sorted(used[key]))))
        for key in operations
    }


def _store(entry: Path, texts: dict[str, str]) -> None:
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=entry.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(texts, out, sort_keys=True)
        os.replace(tmp, entry)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
