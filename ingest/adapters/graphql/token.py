"""The backend bearer token: where it comes from, and a holder that never shows it.

The token comes from an environment variable or a file (re-read once on HTTP 401 by the sink, so a
rotated token is picked up without a restart). It is sent only as the ``Authorization`` header and never
appears in a log line, an exception message or a repr (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.errors import ConfigError, RetryableSinkError

__all__ = ["ClientCredentialsToken", "Secret", "TokenSource"]

LOGGER = logging.getLogger(__name__)


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


class ClientCredentialsToken:
    """An OAuth2 access token got with the client credentials grant (RFC 6749 4.4), refreshed before it
    expires: how Medplum (and most FHIR servers) issue tokens to a service, valid for about an hour.

    The token request is made by Authlib's OAuth2 client (HTTP Basic client authentication, as Medplum's
    ``/oauth2/token`` accepts); the token is fetched again when less than a tenth of its lifetime (at
    least 30 s) is left, and at once after a 401. The client secret comes from an environment variable or
    a file (re-read for each token request, so a rotated secret is picked up) and never appears in a
    log line, message or repr.

    Parameters
    ----------
    token_url:
        The token endpoint (``https://api.medplum.com/oauth2/token``).
    client_id:
        The client application's id.
    secret:
        Where the client secret is read from (a :class:`TokenSource` naming the variable or file).
    scope:
        Optional scope to ask for.
    ssl_context:
        The TLS context for the token endpoint (``[backend] ca``), or ``True`` for the system CAs.
    timeout_s:
        Timeout of one token request.
    """

    def __init__(
        self, token_url: str, client_id: str, secret: TokenSource, *, scope: str | None = None,
        ssl_context: Any = True, timeout_s: float = 30.0,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = secret
        self._scope = scope
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._token: Secret | None = None
        self._renew_at = 0.0  # monotonic time after which the token is fetched again
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<ClientCredentialsToken client_id={self.client_id!r} token_url={self.token_url!r}>"

    async def current(self, *, refresh: bool = False) -> Secret:
        """The access token to send now; fetched when there is none, it is about to expire, or
        ``refresh`` (after the backend answered 401 to it).

        Raises
        ------
        ConfigError
            The secret cannot be read, or the endpoint refuses the client (``invalid_client``,
            ``unauthorized_client``, ...): a configuration the relay cannot fix by retrying.
        RetryableSinkError
            The token endpoint cannot be reached now or answers with a server error.
        """
        async with self._lock:
            if self._token is not None and not refresh and time.monotonic() < self._renew_at:
                return self._token
            self._token, lifetime = await self._fetch()
            self._renew_at = time.monotonic() + max(lifetime - max(30.0, lifetime / 10), lifetime / 2)
            return self._token

    async def _fetch(self) -> tuple[Secret, float]:
        from authlib.integrations.base_client.errors import OAuthError
        from authlib.integrations.httpx_client import AsyncOAuth2Client

        secret = self._secret.read()
        if secret is None:
            where = self._secret.file or self._secret.env
            raise ConfigError(f"[backend] client secret: {where} holds no secret (client_secret_env / "
                              "client_secret_file)")
        client = AsyncOAuth2Client(
            client_id=self.client_id, client_secret=secret.reveal(), scope=self._scope,
            token_endpoint_auth_method="client_secret_basic", verify=self._ssl, timeout=self._timeout_s,
            trust_env=False,
        )
        try:
            token = await client.fetch_token(self.token_url, grant_type="client_credentials")
        except OAuthError as exc:  # the endpoint's own error code (RFC 6749 5.2), never its description
            raise ConfigError(f"[backend] token_url {self.token_url}: the token endpoint refused the client "
                              f"{self.client_id!r}: {exc.error}") from None
        except Exception as exc:  # httpx transport errors, HTTP 5xx, a body that is not a token answer
            raise RetryableSinkError(
                f"[backend] token_url {self.token_url}: no token: {type(exc).__name__}"
            ) from None
        finally:
            await client.aclose()
        access = token.get("access_token")
        if not access:
            raise RetryableSinkError(
                f"[backend] token_url {self.token_url}: the answer holds no access_token"
            )
        try:
            lifetime = float(token.get("expires_in") or 3600)
        except (TypeError, ValueError):
            lifetime = 3600.0
        LOGGER.info("backend access token obtained from %s (valid %.0f s)", self.token_url, lifetime)
        return Secret(str(access)), max(lifetime, 1.0)
