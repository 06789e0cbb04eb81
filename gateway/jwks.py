"""Public keys for RS256/ES256 user tokens, from a JWKS file or URL.

Keys are cached for `ttl_s` and fetched again when a token names a key id the cache
does not hold (the issuer rotated its keys), but at most once every `min_refresh_s`:
tokens with made-up key ids cannot turn the gateway into a fetch loop. A failed fetch
keeps the keys already known. Only asymmetric public keys are taken from the set: a
symmetric (`oct`) key in a JWKS would let anyone who can read the set sign tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from joserfc.jwk import ECKey, RSAKey

log = logging.getLogger("gateway.jwks")

# The key type each accepted asymmetric algorithm needs (and, for EC, its curve).
KEY_TYPES: dict[str, tuple[str, str | None]] = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}
MAX_JWKS_BYTES = 256 * 1024

PublicKey = RSAKey | ECKey


class JwksError(Exception):
    """The key set could not be read or holds nothing usable."""


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: PublicKey


def parse(raw: bytes | str) -> list[StoredKey]:
    """The usable signature keys of a JWKS document."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise JwksError(f"the key set is not JSON ({exc})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise JwksError('the key set has no "keys" list')
    keys: list[StoredKey] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC"):
            continue  # symmetric or unsupported keys are never trusted from a key set
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        try:
            key: PublicKey = RSAKey.import_key(public) if kty == "RSA" else ECKey.import_key(public)
        except Exception as exc:
            log.warning("gateway.jwks.key_skipped kid=%r error=%s", entry.get("kid"), exc)
            continue
        kid = entry.get("kid")
        keys.append(
            StoredKey(
                kid=kid if isinstance(kid, str) else None,
                kty=kty,
                crv=entry.get("crv") if isinstance(entry.get("crv"), str) else None,
                alg=entry.get("alg") if isinstance(entry.get("alg"), str) else None,
                key=key,
            )
        )
    if not keys:
        raise JwksError("the key set holds no RSA or EC signature key")
    return keys


class JwksSource:
    """Cached key set from `file` or `url`; `key(kid, alg)` finds the verification key."""

    def __init__(
        self,
        *,
        file: str = "",
        url: str = "",
        ttl_s: float = 300,
        min_refresh_s: float = 10,
        timeout_s: float = 5,
    ) -> None:
        if bool(file) == bool(url):
            raise ValueError("give exactly one of file or url")
        self.file = file
        self.url = url
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self._keys: list[StoredKey] = []
        self._loaded_at = float("-inf")
        self._tried_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return self.file or self.url

    async def key(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key for a token's `kid` and `alg`, refreshing once if it is unknown."""
        if time.monotonic() - self._loaded_at > self.ttl_s:
            await self.refresh()
        found = self._find(kid, alg)
        if found is None and time.monotonic() - self._tried_at >= self.min_refresh_s:
            await self.refresh()
            found = self._find(kid, alg)
        return found

    def _find(self, kid: str | None, alg: str) -> PublicKey | None:
        kty, crv = KEY_TYPES[alg]
        fits = [
            k
            for k in self._keys
            if k.kty == kty and (crv is None or k.crv == crv) and k.alg in (None, alg)
        ]
        if kid is None:
            # A token without `kid` is only unambiguous when one key could have signed it.
            return fits[0].key if len(fits) == 1 else None
        return next((k.key for k in fits if k.kid == kid), None)

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._tried_at < 0.05:
                return  # another caller just refreshed while this one waited
            self._tried_at = time.monotonic()
            try:
                raw = await self._fetch()
                self._keys = parse(raw)
                self._loaded_at = time.monotonic()
                log.info("gateway.jwks.loaded source=%s keys=%d", self.where, len(self._keys))
            except Exception as exc:  # keep serving with the keys already known
                log.warning(
                    "gateway.jwks.refresh_failed source=%s keys_kept=%d error=%s",
                    self.where,
                    len(self._keys),
                    exc,
                )

    async def _fetch(self) -> bytes:
        if self.file:
            data = await asyncio.to_thread(Path(self.file).read_bytes)
            if len(data) > MAX_JWKS_BYTES:
                raise JwksError(f"{self.file} is larger than {MAX_JWKS_BYTES} bytes")
            return data
        async with (
            httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client,
            client.stream("GET", self.url, headers={"Accept": "application/json"}) as resp,
        ):
            if resp.status_code != 200:
                raise JwksError(f"{self.url} answered HTTP {resp.status_code}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise JwksError(f"{self.url} sent more than {MAX_JWKS_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
