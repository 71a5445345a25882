"""The backend bearer token: where it comes from, and a holder that never shows it.

The token comes from an environment variable or a file (re-read once on HTTP 401 by the sink, so a
rotated token is picked up without a restart). It is sent only as the ``Authorization`` header and never
appears in a log line, an exception message or a repr (docs/reliability.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import ConfigError

__all__ = ["Secret", "TokenSource"]


class Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TokenSource:
    """Where the backend bearer token comes from: a file (preferred when both are set) or an env variable.

    Only the *names* are held here, never the token, so a repr is safe to log.

    Parameters
    ----------
    env:
        Name of the environment variable holding the token.
    file:
        Path of a file holding the token (surrounding whitespace is ignored); re-read on HTTP 401, so a
        rotated token is picked up without a restart.
    """

    env: str | None = None
    file: Path | None = None

    def read(self) -> Secret | None:
        """Read the token now; ``None`` when no source holds one.

        Raises
        ------
        ConfigError
            When the token file cannot be read (the message names the file, never its content).
        """
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read the backend token file {self.file}: {type(exc).__name__}"
                ) from None
            if text:
                return Secret(text)
        if self.env:
            value = os.environ.get(self.env, "").strip()
            if value:
                return Secret(value)
        return None
