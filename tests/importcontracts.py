"""An import-linter contract type for the project's ``pyproject.toml``: external submodules never imported.

import-linter's own ``forbidden`` contract sees an external package as one node (``pynetdicom``), so it
cannot forbid ``pynetdicom.dul`` while allowing ``pynetdicom.pdu``. This contract reads the import
lines grimp records for each import of the external package and refuses those naming a forbidden
submodule (``import pynetdicom.dul``, ``from pynetdicom.dul import ...``, ``from pynetdicom import dul``).
"""

from __future__ import annotations

import re
from typing import Any

from importlinter import Contract, ContractCheck, fields, output

_FROM = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+\(?([^)#]*)")
_IMPORT = re.compile(r"^\s*import\s+([\w., ]+)")


def _named(line: str) -> set[str]:
    """The dotted modules an import line names (``from a import b, c``: ``a``, ``a.b``, ``a.c``)."""
    if m := _FROM.match(line):
        base = m.group(1)
        names = {base}
        for part in m.group(2).split(","):
            name = part.strip().split(" as ")[0].strip()
            if name and name != "*":
                names.add(f"{base}.{name}")
        return names
    if m := _IMPORT.match(line):
        return {part.strip().split(" as ")[0].strip() for part in m.group(1).split(",")}
    return set()


class ExternalSubmodulesContract(Contract):
    """``source_modules`` import none of ``forbidden_modules`` (submodules of external packages),
    directly: each forbidden name is a module, matched with its own submodules."""

    type_name = "external_submodules"

    source_modules = fields.SetField(subfield=fields.ModuleField())
    forbidden_modules = fields.SetField(subfield=fields.ModuleField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        forbidden = {m.name for m in self.forbidden_modules}
        roots = {name.split(".")[0] for name in forbidden}
        broken: list[tuple[str, int, str]] = []
        sources = set()
        for source in self.source_modules:
            sources |= {source.name} | graph.find_descendants(source.name)
        for importer in sorted(sources):
            for root in roots:
                if root not in graph.modules:
                    continue
                for detail in graph.get_import_details(importer=importer, imported=root):
                    line = str(detail["line_contents"])
                    hit = {
                        name for name in _named(line)
                        if any(name == f or name.startswith(f + ".") for f in forbidden)
                    }
                    if hit:
                        broken.append((importer, int(detail["line_number"]), line))
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, line_number, line in check.metadata["broken"]:
            output.print_error(f"{importer}:{line_number}: {line}", bold=False)
            output.new_line()
