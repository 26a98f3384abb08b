"""The mirror's own Xet credentials: access tokens it hands callers for its CAS, and the signed
xorb URLs it writes into reconstructions. Both are HMAC-signed claims with an expiry, so a check
needs no state; the key is made per process (a restart or another node asks the client to refresh).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass

from proxy.sources.hf.errors import HfError

TOKEN_SECONDS = 600.0  # hf_xet asks the refresh route again before this runs out
XORB_URL_SECONDS = 3600.0  # a reconstruction's xorb URLs, as long as the Hub's CAS signs its own


@dataclass(frozen=True, slots=True)
class XetGrant:
    """What a mirror token lets its bearer read: one repo's Xet files, until `expires`."""

    repo_type: str
    repo_id: str
    revision: str
    caller: str  # hash of the caller's Hub token ("" for none): which upstream token serves it
    expires: float


@dataclass(frozen=True, slots=True)
class XorbGrant:
    """A signed xorb URL: the repo whose reconstruction named the xorb, and where its origin URL is."""

    grant: XetGrant
    file_hash: str
    file_range: str  # the reconstruction's Range ("" for the whole file): names the cached answer
    xorb: str


class XetTokens:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or os.urandom(32)

    def mint(self, grant: XetGrant) -> str:
        return self._sign({"k": "t", "t": grant.repo_type, "r": grant.repo_id, "v": grant.revision, "c": grant.caller,
                           "e": int(grant.expires)})

    def check(self, token: str | None) -> XetGrant:
        claims = self._open(token, "t")
        return _grant(claims)

    def sign_xorb(self, xorb: XorbGrant, expires: float) -> str:
        g = xorb.grant
        return self._sign({"k": "x", "t": g.repo_type, "r": g.repo_id, "v": g.revision, "c": g.caller, "e": int(expires),
                           "f": xorb.file_hash, "g": xorb.file_range, "x": xorb.xorb})

    def check_xorb(self, signed: str | None, xorb: str) -> XorbGrant:
        claims = self._open(signed, "x")
        if claims.get("x") != xorb:
            raise HfError(403, "this xorb URL was signed for another xorb")
        return XorbGrant(_grant(claims), str(claims["f"]), str(claims["g"]), xorb)

    def _sign(self, claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).rstrip(b"=")
        return f"{body.decode()}.{mac.decode()}"

    def _open(self, token: str | None, kind: str) -> dict[str, object]:
        if not token or len(token) > 4096 or token.count(".") != 1:
            raise HfError(401, "a Xet token of this mirror is required")
        body, mac = token.encode().split(b".")
        expected = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).rstrip(b"=")
        if not hmac.compare_digest(mac, expected):
            raise HfError(401, "not a Xet token of this mirror (or of its previous start): ask for a new one")
        claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        if not isinstance(claims, dict) or claims.get("k") != kind:
            raise HfError(401, "not a Xet token of this kind")
        if float(claims["e"]) < time.time():
            raise HfError(401, "the Xet token expired: ask for a new one")
        return claims


def _grant(claims: dict[str, object]) -> XetGrant:
    return XetGrant(str(claims["t"]), str(claims["r"]), str(claims["v"]), str(claims["c"]), float(claims["e"]))  # type: ignore[arg-type]
