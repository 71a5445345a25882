"""Fitting the documents to the backend's schema; pure (no I/O).

The schema is the backend's introspected one, or the SDL given as ``[backend] schema``
(:func:`load_schema_file`). :func:`fit_schema` builds ImagingStudy's documents from it
(docs/architecture.md "Writing the backend"):

- the update mutation's ``res`` argument type is read from the schema (Medplum:
  ``ImagingStudyUpdate(id: ID!, res: ImagingStudyCreate!)``; the FHIR GraphQL spec: ``res: ImagingStudy``),
- the selection set that reads a *full* ImagingStudy is built from the output type (every field, object
  fields recursively up to ``max_depth``, extensions two levels at a time; fields with required
  arguments, ``Reference.resource`` and nested resources such as Medplum's reverse-lookup ``...List``
  fields are skipped). Where it stops, a *sentinel* ``field { __typename }`` is selected, and ``contained``
  (a union) as ``contained { __typename }``; :func:`sentinel_paths` finds the non-null ones in an answer
  and :func:`deeper_read` builds the read of just those paths, further down, which :func:`graft` puts in
  place (the sink repeats that until nothing is cut off, docs/mapping.md "The lifecycle of a study"),
- resources are pruned to the fields the input type accepts before they are sent (:meth:`SchemaFit.prune`).

:func:`fit_resource` does the same for the linked resources (Patient, Endpoint). Every document is
validated against the schema here, once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    build_schema,
    get_named_type,
    is_abstract_type,
    is_input_object_type,
    is_leaf_type,
    is_object_type,
    is_required_argument,
    parse,
    validate,
)

from ingest.errors import ConfigError, ForeignContentError

__all__ = [
    "CONTAINED_FIELD",
    "CREATE_FIELD",
    "DEEPER_BUDGET",
    "DEFAULT_MAX_DEPTH",
    "LINKED_MAX_DEPTH",
    "LIST_FIELD",
    "READ_FIELD",
    "TYPENAME",
    "UPDATE_FIELD",
    "ResourceFit",
    "SchemaFit",
    "deeper_read",
    "fit_resource",
    "fit_schema",
    "graft",
    "load_schema_file",
    "prune_to",
    "sentinel_paths",
    "strip_typenames",
]

LOGGER = logging.getLogger(__name__)

READ_FIELD: Final = "ImagingStudy"
LIST_FIELD: Final = "ImagingStudyList"
CREATE_FIELD: Final = "ImagingStudyCreate"
UPDATE_FIELD: Final = "ImagingStudyUpdate"
DEFAULT_MAX_DEPTH: Final = 7
# Patient/Endpoint are only searched and created, never merged: a shallow selection (identifier, name with
# its extensions, address, ...) is enough and keeps the documents small (validation cost grows with size).
LINKED_MAX_DEPTH: Final = 3

# Meta elements a client may set (FHIR R4 Meta): kept so that an update does not strip security labels
# or tags; everything else in ``meta`` (versionId, lastUpdated, server bookkeeping) is server-managed.
_CLIENT_META: Final = frozenset({"profile", "security", "tag"})


def _unwrap_nullable(t: Any) -> Any:
    return t.of_type if isinstance(t, GraphQLNonNull) else t


def _is_resource(t: GraphQLObjectType) -> bool:
    """A FHIR resource type (has ``resourceType``): nested ones are reverse lookups or embedded resources."""
    return "resourceType" in t.fields


_EXTENSION_BUDGET: Final = 2
#: The one union/interface field that holds stored content: ``Resource.contained`` (Medplum: a list of the
#: ``ResourceList`` union). Others (``Reference.resource``) resolve links and are never selected.
CONTAINED_FIELD: Final = "contained"
#: The response key a sentinel selects (``field { __typename }``): a field selected only this way holds
#: content below the selection's cut-off when its value is non-null.
TYPENAME: Final = "__typename"
#: Levels each deeper read selects below the sentinel it replaces (with the usual extension cut-off).
DEEPER_BUDGET: Final = 4


class _SelectionBuilder:
    """Named fragments per (object type, remaining depth): linear in size, no fragment cycles.

    With ``sentinels`` (the ImagingStudy reads), an object field at the cut-off (depth exhausted, or the
    extension budget) is selected as ``field { __typename }`` and ``contained`` as
    ``contained { __typename }``: a non-null value there tells the reader that the resource holds more
    than the selection read (see :func:`sentinel_paths` and :func:`deeper_read`).
    """

    def __init__(self, *, sentinels: bool = False) -> None:
        self.fragments: dict[str, str] = {}
        self.sentinels = sentinels

    def fragment(self, t: GraphQLObjectType, budget: int) -> str | None:
        name = f"{'S' if self.sentinels else 'D'}{budget}_{t.name}"
        if name in self.fragments:
            return name
        parts: list[str] = []
        for fname, fdef in t.fields.items():
            if fname.startswith("__") or any(is_required_argument(a) for a in fdef.args.values()):
                continue  # e.g. Medplum's reverse lookups ``ObservationList(_reference: ...!)``
            named = get_named_type(fdef.type)
            if is_leaf_type(named):
                parts.append(fname)
            elif isinstance(named, GraphQLObjectType) and not _is_resource(named):
                sub_budget = budget - 1
                if named.name == "Extension":
                    # Every FHIR datatype has ``extension`` and Extension has ~50 value[x] datatypes: read
                    # extensions only two levels deep (url, primitive values, codings, nested extension
                    # urls/primitives), or the document grows to tens of kilobytes and every backend parse
                    # and validation of it costs hundreds of milliseconds. What lies deeper is signalled
                    # by a sentinel and read by a deeper read of that path only.
                    sub_budget = min(sub_budget, _EXTENSION_BUDGET)
                # with sentinels, a field whose type would get no further levels is a sentinel itself
                # (a fragment of leaves only would double the document for the rare deep content)
                reach = sub_budget > 0 if self.sentinels else budget > 0
                sub = self.fragment(named, sub_budget) if reach else None
                if sub is not None:
                    parts.append(f"{fname} {{ ...{sub} }}")
                elif self.sentinels:
                    parts.append(f"{fname} {{ {TYPENAME} }}")
            elif self.sentinels and fname == CONTAINED_FIELD and is_abstract_type(named):
                parts.append(f"{fname} {{ {TYPENAME} }}")
            # other union/interface fields (Reference.resource) and nested resources are skipped
        if not parts:
            return None
        self.fragments[name] = f"fragment {name} on {t.name} {{ {' '.join(parts)} }}"
        return name


def _is_sentinel(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {TYPENAME}


def sentinel_paths(resource: Any) -> list[tuple[str, ...]]:
    """Where a read stopped short: the paths of non-null sentinel fields in a raw GraphQL answer.

    Parameters
    ----------
    resource:
        The answer of a read built with sentinels (``__typename`` still in it, nothing stripped).

    Returns
    -------
    list of tuple
        One path per sentinel field, as field names from the resource root (list indexes left out:
        GraphQL selects every element); a step into a ``contained`` item is ``@<type>``. A contained
        sentinel's path ends with ``contained@<type>`` naming the type found. Empty: the read is complete.
    """
    found: set[tuple[str, ...]] = set()

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, path)
            return
        if not isinstance(value, Mapping):
            return
        for key, sub in value.items():
            if key == TYPENAME or sub is None:
                continue
            items = sub if isinstance(sub, list) else [sub]
            if key == CONTAINED_FIELD:
                for item in items:
                    if not isinstance(item, Mapping):
                        continue
                    kind = str(item.get(TYPENAME, ""))
                    if _is_sentinel(item):
                        found.add((*path, f"{key}@{kind}"))
                    else:
                        walk(item, (*path, key, f"@{kind}"))
                continue
            if any(_is_sentinel(item) for item in items):
                found.add((*path, key))
            else:
                walk(sub, (*path, key))

    walk(resource, ())
    return sorted(found)


def deeper_read(
    schema: GraphQLSchema, paths: list[tuple[str, ...]], *, root: str = READ_FIELD
) -> str:
    """A read-by-id document that selects only ``paths`` (from :func:`sentinel_paths`), each
    :data:`DEEPER_BUDGET` levels further, plus ``meta { versionId }`` to check that both reads saw one
    version; pure.

    Raises
    ------
    ForeignContentError
        ``incomplete_read``: a path does not exist in the schema, or a contained resource's type is not
        one the backend can return (not an object type of the ``contained`` union).
    """
    query = schema.query_type
    read_f = query.fields.get(root) if query is not None else None
    if read_f is None or "id" not in read_f.args:
        raise ForeignContentError(
            "the backend copy holds content below the read's depth and the backend has no "
            f"{root}(id:) to read it deeper", reason="incomplete_read"
        )
    builder = _SelectionBuilder(sentinels=True)
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for step in path[:-1]:
            node = node.setdefault(step, {})
        node.setdefault(path[-1], None)

    def unreadable(what: str) -> ForeignContentError:
        return ForeignContentError(
            f"the backend copy holds {what}, which its GraphQL schema cannot return; writing would "
            "lose it", reason="incomplete_read"
        )

    def select(t: GraphQLObjectType, node: Mapping[str, Any]) -> str:
        parts: list[str] = []
        for step, sub in node.items():
            fname, _, kind = step.partition("@")
            fdef = t.fields.get(fname)
            if fdef is None:
                raise unreadable(f"an element {fname!r} of {t.name}")
            named = get_named_type(fdef.type)
            if fname == CONTAINED_FIELD and is_abstract_type(named):
                parts.append(f"{fname} {{ {TYPENAME} {contained(named, kind, sub)} }}")
            elif isinstance(named, GraphQLObjectType):
                if sub is None:
                    frag = builder.fragment(named, DEEPER_BUDGET)
                    inner = f"...{frag}" if frag is not None else TYPENAME
                else:
                    inner = select(named, sub)
                parts.append(f"{fname} {{ {inner} }}")
            else:
                raise unreadable(f"an element {fname!r} of {t.name}")
        return " ".join(parts)

    def contained(union: Any, kind: str, sub: Any) -> str:
        # a step "contained@T" (a leaf) reads the T items whole; "contained" + "@T" + ... goes deeper in T
        groups: dict[str, Any] = {kind: None} if kind else dict(sub or {})
        out = []
        for step, inner in groups.items():
            type_name = step.removeprefix("@")
            member = schema.get_type(type_name)
            if not isinstance(member, GraphQLObjectType) or not schema.is_sub_type(union, member):
                raise unreadable(f"a contained resource of type {type_name or 'unknown'!r}")
            if inner is None:
                frag = builder.fragment(member, DEEPER_BUDGET)
                body = f"...{frag}" if frag is not None else TYPENAME
            else:
                body = select(member, inner)
            out.append(f"... on {type_name} {{ {body} }}")
        return " ".join(out)

    out_type = _object_of(read_f, root)
    body = select(out_type, tree)
    if "meta" in out_type.fields and "meta" not in tree:
        body += " meta { versionId }"
    op = f"query ReadImagingStudyDeeper($id: {read_f.args['id'].type}) {{ {root}(id: $id) {{ {body} }} }}"
    return op + "\n" + "\n".join(_used_fragments(op, builder.fragments))


def graft(base: Any, deep: Any) -> bool:
    """Put what a :func:`deeper_read` returned in place of the sentinels of ``base`` (in place).

    Returns ``False`` when the two answers do not line up (a list of another length, a contained item
    of another type): the resource changed between the reads.
    """
    if isinstance(base, list) and isinstance(deep, list):
        if len(base) != len(deep):
            return False
        return all(graft(b, d) for b, d in zip(base, deep, strict=True))
    if not (isinstance(base, dict) and isinstance(deep, Mapping)):
        return base == deep or deep is None
    if TYPENAME in deep and TYPENAME in base and base[TYPENAME] != deep[TYPENAME]:
        return False
    for key, value in deep.items():
        if key == TYPENAME:
            continue
        current = base.get(key)
        items = current if isinstance(current, list) else [current]
        if current is None or all(_is_sentinel(i) for i in items) or _is_sentinel(current):
            if key == "meta":
                continue  # the version check is the caller's
            base[key] = value
        elif not graft(current, value):
            return False
    return True


def strip_typenames(value: Any) -> Any:
    """``value`` without the ``__typename`` members the reads selected (a copy)."""
    if isinstance(value, Mapping):
        return {k: strip_typenames(v) for k, v in value.items() if k != TYPENAME}
    if isinstance(value, list):
        return [strip_typenames(v) for v in value]
    return value


@dataclass(frozen=True)
class SchemaFit:
    """The documents and input type fitted to one backend schema (built by :func:`fit_schema`).

    Attributes
    ----------
    read:
        ``ImagingStudy(id:)`` full read, or ``None`` when the backend has no read-by-id field.
    search:
        ``ImagingStudyList(identifier:[, _count:])`` returning full resources.
    create, update:
        The two mutations, ``res`` typed as the schema says.
    input_type:
        The input object type of the update's ``res`` argument (what :meth:`prune` keeps).
    has_count:
        Whether ``ImagingStudyList`` accepts ``_count``.
    """

    schema: GraphQLSchema
    read: str | None
    search: str
    create: str
    update: str
    input_type: GraphQLInputObjectType
    create_input_type: GraphQLInputObjectType
    has_count: bool
    documents: Mapping[str, DocumentNode] = field(repr=False)

    @property
    def update_res_type(self) -> str:
        """The declared type of the update's ``$res`` variable (e.g. ``ImagingStudyCreate!``)."""
        mutation = self.schema.mutation_type
        assert mutation is not None
        return str(mutation.fields[UPDATE_FIELD].args["res"].type)

    def prune(
        self, resource: Mapping[str, Any], *, for_create: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """Keep only what the input type accepts, recursively; ``None`` values are dropped.

        Parameters
        ----------
        resource:
            FHIR JSON of an ImagingStudy.
        for_create:
            Prune against the create mutation's input type instead of the update's.

        Returns
        -------
        tuple
            The pruned copy, and the sorted dotted paths that were dropped (names only, never values).
        """
        input_type = self.create_input_type if for_create else self.input_type
        dropped: set[str] = set()
        out: dict[str, Any] = {}
        for key, value in resource.items():
            if key == "meta" and isinstance(value, Mapping):  # ImagingStudy.meta: server-managed parts out
                dropped.update(f"meta.{k}" for k in value if k not in _CLIENT_META)
                value = {k: v for k, v in value.items() if k in _CLIENT_META}
                if not value:
                    continue
            fdef = input_type.fields.get(key)
            if fdef is None:
                dropped.add(key)
                continue
            kept = _prune_value(value, fdef.type, key, dropped)
            if kept is not None:
                out[key] = kept
        return out, sorted(dropped)


def prune_to(
    resource: Mapping[str, Any], input_type: GraphQLInputObjectType
) -> tuple[dict[str, Any], list[str]]:
    """``resource`` without what ``input_type`` does not accept (and without server-managed ``meta``)."""
    dropped: set[str] = set()
    source = {k: v for k, v in resource.items() if k not in ("meta", "id")}
    pruned = _prune_value(source, input_type, "", dropped)
    return (pruned if isinstance(pruned, dict) else {}), sorted(p.lstrip(".") for p in dropped)


def _prune_value(value: Any, t: GraphQLInputType, path: str, dropped: set[str]) -> Any:
    t = _unwrap_nullable(t)
    if value is None:
        return None
    if isinstance(t, GraphQLList):
        if not isinstance(value, list):
            return value  # let the backend say what is wrong with it
        items = [_prune_value(v, t.of_type, f"{path}[]", dropped) for v in value]
        return [v for v in items if v is not None]
    if isinstance(t, GraphQLInputObjectType) and isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            fdef = t.fields.get(key)
            if fdef is None:
                dropped.add(f"{path}.{key}")
                continue
            kept = _prune_value(sub, fdef.type, f"{path}.{key}", dropped)
            if kept is not None:
                out[key] = kept
        return out
    return value


def _field(parent: GraphQLObjectType | None, name: str, *, required: bool = True) -> GraphQLField | None:
    f = parent.fields.get(name) if parent is not None else None
    if f is None and required:
        kind = "query" if name in (READ_FIELD, LIST_FIELD) else "mutation"
        raise ConfigError(
            f"the backend schema has no {kind} field {name}; ingest needs {LIST_FIELD}, {CREATE_FIELD} "
            f"and {UPDATE_FIELD} (a FHIR GraphQL server exposing ImagingStudy)"
        )
    return f


def _args_for(fdef: GraphQLField, fname: str, supplied: set[str]) -> None:
    for aname in supplied:
        if aname not in fdef.args:
            raise ConfigError(f"the backend's {fname} has no argument {aname!r}; cannot fit the document")
    for aname, arg in fdef.args.items():
        if aname not in supplied and is_required_argument(arg):
            raise ConfigError(
                f"the backend's {fname} requires argument {aname!r}, which ingest cannot supply"
            )


def _input_object(fdef: GraphQLField, fname: str) -> GraphQLInputObjectType:
    named = get_named_type(fdef.args["res"].type)
    if not is_input_object_type(named):
        raise ConfigError(f"the backend's {fname}(res:) is not an input object type ({named})")
    assert isinstance(named, GraphQLInputObjectType)
    return named


def _object_of(fdef: GraphQLField, fname: str) -> GraphQLObjectType:
    named = get_named_type(fdef.type)
    if not is_object_type(named):
        raise ConfigError(f"the backend's {fname} does not return an object type ({named})")
    assert isinstance(named, GraphQLObjectType)
    return named


def fit_schema(schema: GraphQLSchema, *, max_depth: int = DEFAULT_MAX_DEPTH) -> SchemaFit:
    """Build the documents for one backend schema; pure (no I/O).

    Parameters
    ----------
    schema:
        The backend schema (introspected or built from SDL).
    max_depth:
        How many levels of nested object types below ImagingStudy the full read selects.

    Returns
    -------
    SchemaFit

    Raises
    ------
    ConfigError
        When the schema lacks ``ImagingStudyList``, ``ImagingStudyCreate`` or ``ImagingStudyUpdate``, their
        arguments do not fit, or a built document does not validate against the schema.
    """
    query, mutation = schema.query_type, schema.mutation_type
    list_f = _field(query, LIST_FIELD)
    read_f = _field(query, READ_FIELD, required=False)
    create_f = _field(mutation, CREATE_FIELD)
    update_f = _field(mutation, UPDATE_FIELD)
    assert list_f is not None and create_f is not None and update_f is not None

    has_count = "_count" in list_f.args
    _args_for(list_f, LIST_FIELD, {"identifier", "_count"} if has_count else {"identifier"})
    _args_for(create_f, CREATE_FIELD, {"res"})
    _args_for(update_f, UPDATE_FIELD, {"id", "res"})
    if read_f is not None and "id" not in read_f.args:
        read_f = None  # a read field we cannot call: search instead

    builder = _SelectionBuilder(sentinels=True)

    def selection(fdef: GraphQLField, fname: str) -> str:
        name = builder.fragment(_object_of(fdef, fname), max_depth)
        if name is None:
            raise ConfigError(f"the backend's {fname} returns a type without selectable fields")
        return f"{{ ...{name} }}"

    def written_selection(fdef: GraphQLField, fname: str) -> str:
        # A write only needs the new id and version back (the content is what we sent); asking for the
        # whole resource makes the backend serialise it again for nothing.
        out = _object_of(fdef, fname)
        meta = get_named_type(out.fields["meta"].type) if "meta" in out.fields else None
        if "id" in out.fields and isinstance(meta, GraphQLObjectType) and "versionId" in meta.fields:
            last = " lastUpdated" if "lastUpdated" in meta.fields else ""
            return f"{{ id meta {{ versionId{last} }} }}"
        return selection(fdef, fname)

    def arg_type(fdef: GraphQLField, aname: str) -> str:
        return str(fdef.args[aname].type)

    ops: dict[str, str] = {}
    if read_f is not None:
        ops["read"] = (
            f"query ReadImagingStudy($id: {arg_type(read_f, 'id')}) "
            f"{{ {READ_FIELD}(id: $id) {selection(read_f, READ_FIELD)} }}"
        )
    count_var = f", $count: {arg_type(list_f, '_count')}" if has_count else ""
    count_arg = ", _count: $count" if has_count else ""
    ops["search"] = (
        f"query FindImagingStudy($identifier: {arg_type(list_f, 'identifier')}{count_var}) "
        f"{{ {LIST_FIELD}(identifier: $identifier{count_arg}) {selection(list_f, LIST_FIELD)} }}"
    )
    ops["create"] = (
        f"mutation CreateImagingStudy($res: {arg_type(create_f, 'res')}) "
        f"{{ {CREATE_FIELD}(res: $res) {written_selection(create_f, CREATE_FIELD)} }}"
    )
    ops["update"] = (
        f"mutation UpdateImagingStudy($id: {arg_type(update_f, 'id')}, $res: {arg_type(update_f, 'res')}) "
        f"{{ {UPDATE_FIELD}(id: $id, res: $res) {written_selection(update_f, UPDATE_FIELD)} }}"
    )

    texts = {key: op + "\n" + "\n".join(_used_fragments(op, builder.fragments)) for key, op in ops.items()}
    documents = _parse_and_validate(schema, ops, builder.fragments)
    if documents is None:  # say which document does not validate
        for key, text in texts.items():
            errors = validate(schema, parse(text))
            if errors:
                raise ConfigError(
                    f"the {key} document does not validate against the backend schema: {errors[0]}"
                )
        raise ConfigError("the fitted documents do not validate together against the backend schema")
    return SchemaFit(
        schema=schema,
        read=texts.get("read"),
        search=texts["search"],
        create=texts["create"],
        update=texts["update"],
        input_type=_input_object(update_f, UPDATE_FIELD),
        create_input_type=_input_object(create_f, CREATE_FIELD),
        has_count=has_count,
        documents=documents,
    )


def _parse_and_validate(
    schema: GraphQLSchema, ops: Mapping[str, str], fragments: Mapping[str, str]
) -> dict[str, DocumentNode] | None:
    """Each operation of ``ops`` as its own document (the operation, then the fragments it uses, sorted by
    name, as :func:`_used_fragments` lists them); ``None`` when they do not validate against ``schema``.

    The operations share most of their (large) fragments: all of them are parsed and validated as one
    document, which costs about what one of them alone does. A document holding the operations (distinct
    names) and exactly the fragments they use is valid if and only if each operation with the fragments
    it uses is: every validation rule looks at one operation and what it reaches, or at names that are
    unique in either case.
    """
    used = {key: _used_names(op, fragments) for key, op in ops.items()}
    names = sorted(set().union(*used.values()))
    combined = parse("\n".join([*ops.values(), *(fragments[n] for n in names)]))
    if validate(schema, combined):
        return None
    definitions = list(combined.definitions)
    operations = dict(zip(ops, definitions[: len(ops)], strict=True))
    by_name = dict(zip(names, definitions[len(ops) :], strict=True))
    return {
        key: DocumentNode(definitions=(operations[key], *(by_name[n] for n in sorted(used[key]))))
        for key in ops
    }


def _used_names(text: str, fragments: Mapping[str, str]) -> list[str]:
    """The names of the fragments ``text`` reaches (transitively)."""
    seen: list[str] = []
    todo = re.findall(r"\.\.\.(\w+)", text)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo.extend(re.findall(r"\.\.\.(\w+)", fragments[name]))
    return seen


def _used_fragments(text: str, fragments: Mapping[str, str]) -> list[str]:
    """The fragment definitions ``text`` reaches (transitively); unused ones would fail validation."""
    return [fragments[n] for n in sorted(_used_names(text, fragments))]


@dataclass(frozen=True)
class ResourceFit:
    """Search-by-identifier and create documents for one more resource type (Patient, Endpoint).

    Built by :func:`fit_resource` the same way :func:`fit_schema` builds ImagingStudy's.

    Attributes
    ----------
    resource_type:
        The FHIR resource type, e.g. ``"Patient"``.
    search, create:
        ``<Type>List(identifier:[, _count:])`` and ``<Type>Create(res:)``, selecting full resources.
    create_input_type:
        The input object type of the create's ``res`` argument (what resources are pruned to).
    has_count:
        Whether ``<Type>List`` accepts ``_count``.
    """

    resource_type: str
    search: DocumentNode = field(repr=False)
    create: DocumentNode = field(repr=False)
    create_input_type: GraphQLInputObjectType
    has_count: bool


def fit_resource(
    schema: GraphQLSchema,
    resource_type: str,
    *,
    max_depth: int = LINKED_MAX_DEPTH,
    search_arg: str = "identifier",
) -> ResourceFit | None:
    """Fit the identifier search and the create mutation of ``resource_type`` to a backend schema; pure.

    Parameters
    ----------
    schema:
        The backend schema (introspected or built from SDL).
    resource_type:
        A FHIR resource type the backend may expose, e.g. ``"Patient"`` or ``"Endpoint"``.
    max_depth:
        How many levels of nested object types the selection reads.
    search_arg:
        The token argument the search passes ``$identifier`` to (``target`` for a Provenance, which FHIR
        R4 gives no ``identifier`` search parameter).

    Returns
    -------
    ResourceFit or None
        ``None`` when the schema has no ``<Type>List(identifier:)`` or ``<Type>Create(res:)``, or when
        they take arguments ingest cannot supply; callers that need the type refuse to start then.
    """
    list_name, create_name = f"{resource_type}List", f"{resource_type}Create"
    query, mutation = schema.query_type, schema.mutation_type
    list_f = query.fields.get(list_name) if query is not None else None
    create_f = mutation.fields.get(create_name) if mutation is not None else None
    if list_f is None or create_f is None or search_arg not in list_f.args:
        return None
    has_count = "_count" in list_f.args
    try:
        _args_for(list_f, list_name, {search_arg, "_count"} if has_count else {search_arg})
        _args_for(create_f, create_name, {"res"})
        input_type = _input_object(create_f, create_name)
        builder = _SelectionBuilder()
        selected = builder.fragment(_object_of(list_f, list_name), max_depth)
        created = builder.fragment(_object_of(create_f, create_name), max_depth)
    except ConfigError as exc:
        LOGGER.info("the backend's %s operations do not fit: %s", resource_type, exc)
        return None
    if selected is None or created is None:
        return None
    count_var = f", $count: {list_f.args['_count'].type}" if has_count else ""
    count_arg = ", _count: $count" if has_count else ""
    ops = {
        "search": (
            f"query Find{resource_type}($identifier: {list_f.args[search_arg].type}{count_var}) "
            f"{{ {list_name}({search_arg}: $identifier{count_arg}) {{ ...{selected} }} }}"
        ),
        "create": (
            f"mutation Create{resource_type}($res: {create_f.args['res'].type}) "
            f"{{ {create_name}(res: $res) {{ ...{created} }} }}"
        ),
    }
    documents: dict[str, DocumentNode] = {}
    for key, op in ops.items():
        doc = parse(op + "\n" + "\n".join(_used_fragments(op, builder.fragments)))
        errors = validate(schema, doc)
        if errors:
            LOGGER.info("the %s %s document does not validate: %s", resource_type, key, errors[0])
            return None
        documents[key] = doc
    return ResourceFit(
        resource_type=resource_type,
        search=documents["search"],
        create=documents["create"],
        create_input_type=input_type,
        has_count=has_count,
    )


def load_schema_file(path: Path) -> str:
    """The SDL in ``path`` (``[backend] schema``), checked to parse as a GraphQL schema.

    Parameters
    ----------
    path:
        An SDL file, e.g. the backend's schema printed by an admin who may introspect it.

    Raises
    ------
    ConfigError
        The file does not exist, cannot be read, or is not a GraphQL schema (the message names
        ``[backend] schema``).
    """
    try:
        sdl = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[backend] schema: cannot read {path} ({type(exc).__name__})") from None
    try:
        build_schema(sdl)
    except (GraphQLError, TypeError) as exc:
        detail = exc.message if isinstance(exc, GraphQLError) else str(exc)
        raise ConfigError(f"[backend] schema: {path} is not a GraphQL schema (SDL): {detail}") from None
    return sdl
