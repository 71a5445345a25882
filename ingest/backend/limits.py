"""Cost limits of the embedded backend, checked before a request is executed.

The backend runs in the same process as ``ingest serve``'s C-STORE listener threads, so one expensive
request slows every association (the GIL). Each check here is linear in the size of what it looks at
and refuses before the expensive step it protects:

- the body size (``max_body_bytes``) before anything is decoded;
- the JSON nesting (``max_json_depth``) of the decoded body, before variable coercion recurses into it
  (``json.loads`` itself raises ``RecursionError`` far deeper, which the server answers the same way);
- the query's length, lexical tokens and comments (``max_query_chars``, ``max_tokens``,
  ``max_comments``) while it is parsed;
- the document's shape (:func:`cost_rule`), before the standard validation rules run: some of them
  (overlapping fields) are quadratic in the fields and fragments of one selection set.

A refused request is a client error (HTTP 400, FHIR issue type ``too-costly``); nothing is executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)

__all__ = ["QueryLimits", "cost_rule", "json_depth_exceeds"]

_MIB: Final = 1024 * 1024


@dataclass(frozen=True)
class QueryLimits:
    """What one request to the embedded backend may cost.

    The defaults admit every document ``ingest``'s own GraphQL sink sends (the full ImagingStudy read
    is 9 levels deep with about 760 field selections in 101 fragments; the schema introspection query
    is 13 to 15 levels deep) with a margin.

    Parameters
    ----------
    max_body_bytes:
        Request body size; one ImagingStudy of a large study with its instance lists is the biggest
        legitimate body.
    max_depth:
        Nesting of field selections, fragments expanded (a root field is depth 1).
    max_fields:
        Field selections written in the document (operations and fragments, each counted once).
    max_aliases:
        Aliased fields, fragments expanded (a fragment spread twice counts twice): aliases are how one
        document asks for the same work many times.
    max_query_chars:
        Length of the query text in code points (refused before it is lexed).
    max_tokens:
        Lexical tokens of the query text (the parser stops at the limit).
    max_comments:
        Comments in the query text (the parser stops at the limit).
    max_operations:
        Operation definitions in one document.
    max_merges:
        Fragment spreads, inline fragments and repeated response names in one selection set (the
        standard overlap validation compares them pairwise).
    max_json_depth:
        Nesting of arrays and objects in the JSON body.
    max_resources:
        Resources one request may read (the page sizes of its searches plus its reads); a root field
        over the budget is an execution error. One full page (``_count`` 1000) fits.
    max_concurrent_requests:
        GraphQL requests decoded and executed at once; more wait for a slot.
    """

    max_body_bytes: int = 64 * _MIB
    max_depth: int = 15
    max_fields: int = 1000
    max_aliases: int = 100
    max_query_chars: int = _MIB
    max_tokens: int = 20_000
    max_comments: int = 1000
    max_operations: int = 10
    max_merges: int = 20
    max_json_depth: int = 64
    max_resources: int = 1000
    max_concurrent_requests: int = 4


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests arrays/objects more than ``limit`` levels deep (iterative, no recursion).

    Parameters
    ----------
    value:
        What ``json.loads`` returned.
    limit:
        The deepest nesting allowed (the top-level object is level 1).

    Returns
    -------
    bool
        ``True`` as soon as a container deeper than ``limit`` is found.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (Mapping, list)))
    return False


class _Shape:
    """Depth and expanded alias count of a document, memoized per fragment (so linear in its size)."""

    def __init__(self, fragments: Mapping[str, FragmentDefinitionNode]) -> None:
        self.fragments = fragments
        self.done: dict[str, tuple[int, int]] = {}
        self.visiting: set[str] = set()

    def selection_set(self, node: SelectionSetNode) -> tuple[int, int]:
        """(levels of fields below and including this set, aliases in its expansion)."""
        depth = aliases = 0
        for selection in node.selections:
            if isinstance(selection, FieldNode):
                sub = self.selection_set(selection.selection_set) if selection.selection_set else (0, 0)
                depth = max(depth, sub[0] + 1)
                aliases += sub[1] + (selection.alias is not None)
            elif isinstance(selection, InlineFragmentNode):
                sub = self.selection_set(selection.selection_set)
                depth, aliases = max(depth, sub[0]), aliases + sub[1]
            elif isinstance(selection, FragmentSpreadNode):
                sub = self.fragment(selection.name.value)
                depth, aliases = max(depth, sub[0]), aliases + sub[1]
        return depth, aliases

    def fragment(self, name: str) -> tuple[int, int]:
        known = self.done.get(name)
        if known is not None:
            return known
        definition = self.fragments.get(name)
        if definition is None or name in self.visiting:  # unknown or cyclic: the standard rules say so
            return 0, 0
        self.visiting.add(name)
        try:
            result = self.selection_set(definition.selection_set)
        finally:
            self.visiting.discard(name)
        self.done[name] = result
        return result


def _merges(node: SelectionSetNode) -> int:
    """Selections of one set that the overlap validation compares with each other."""
    seen: set[str] = set()
    count = 0
    for selection in node.selections:
        if isinstance(selection, FieldNode):
            name = (selection.alias or selection.name).value
            count += name in seen
            seen.add(name)
        else:
            count += 1
    return count


def cost_rule(limits: QueryLimits) -> type[ASTValidationRule]:
    """A validation rule refusing documents over ``limits``; run it before the standard rules.

    Parameters
    ----------
    limits:
        The limits to enforce (``max_depth``, ``max_fields``, ``max_aliases``, ``max_operations``,
        ``max_merges``).

    Returns
    -------
    type[graphql.ASTValidationRule]
        For ``graphql.validate(schema, document, [rule])``; it reports at most one error and stops.
    """

    class QueryCostRule(ASTValidationRule):
        """Refuses a document whose shape exceeds the backend's limits (one error, then stops)."""

        def enter_document(self, node: DocumentNode, *_args: object) -> None:
            message = _shape_error(node, limits)
            if message is not None:
                self.report_error(GraphQLError(message))

    return QueryCostRule


def _shape_error(document: DocumentNode, limits: QueryLimits) -> str | None:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if len(operations) > limits.max_operations:
        return f"Query too complex: {len(operations)} operations (at most {limits.max_operations})."
    fields = 0
    sets: list[SelectionSetNode] = [
        d.selection_set
        for d in document.definitions
        if isinstance(d, (OperationDefinitionNode, FragmentDefinitionNode))
    ]
    while sets:  # every selection set written in the document, once
        current = sets.pop()
        if _merges(current) > limits.max_merges:
            return (
                "Query too complex: more than "
                f"{limits.max_merges} fragments or repeated fields in one selection set."
            )
        for selection in current.selections:
            fields += isinstance(selection, FieldNode)
            if isinstance(selection, (FieldNode, InlineFragmentNode)) and selection.selection_set:
                sets.append(selection.selection_set)
        if fields > limits.max_fields:
            return f"Query too complex: more than {limits.max_fields} fields."
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    shape = _Shape(fragments)
    for operation in operations:
        try:
            depth, aliases = shape.selection_set(operation.selection_set)
        except RecursionError:  # a chain of thousands of fragments, each spreading the next
            return "Query too complex: fragments nested too deeply."
        if depth > limits.max_depth:
            return f"Query too complex: {depth} levels deep (at most {limits.max_depth})."
        if aliases > limits.max_aliases:
            return f"Query too complex: {aliases} aliases (at most {limits.max_aliases})."
    return None
