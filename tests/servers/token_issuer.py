"""A Docker-style token issuer for distribution's `auth: token` mode, and a record of what it served.

It checks Basic credentials, grants what the scope asks for, and signs RS256 JWTs whose `x5c`
header carries a self-signed certificate that is also distribution's `rootcertbundle`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Scope:
    """`repository:library/alpine:pull,push` split into its parts (names may hold ':' before the actions)."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not kind or not name:
            return None
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """One request the issuer answered: who asked (None = anonymous), for what, and what came back."""

    method: str
    path: str
    service: str | None
    scopes: tuple[str, ...]
    username: str | None
    status: int
    token: str | None
    user_agent: str

    @property
    def sent_credentials(self) -> bool:
        return self.username is not None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """An RSA key and a self-signed certificate for it, written as PEM files under `directory`."""

    def __init__(self, directory: Path, common_name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-cert.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self.key_path = directory / "token-key.pem"
        self.key_path.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    def jwt(self, claims: dict) -> str:
        """An RS256 JWS in compact form; `x5c` lets distribution verify it against its root bundle."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


class TokenIssuer:
    """The token endpoint (`GET /token?service=..&scope=..`) on a free loopback port, in this process.

    Users in `users` (name -> password) get every action their scopes ask for; wrong credentials
    get 401; an anonymous request gets a token with an empty access list (Docker Hub does the same
    for a private repository), which distribution then refuses. Every answer is kept in
    `requests()` so a test can count token requests per scope.
    """

    def __init__(self, workdir: Path, *, users: dict[str, str], service: str = "pullthrough-test-registry",
                 issuer: str = "pullthrough-test-issuer", expires_in: int = 300, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.signing_key = SigningKey(self.workdir, issuer)
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, workdir: Path, **kwargs) -> TokenIssuer:
        issuer = cls(workdir, **kwargs)
        issuer._thread = threading.Thread(target=issuer._server.serve_forever, kwargs={"poll_interval": 0.05},
                                          name=f"token-issuer-{issuer.port}", daemon=True)
        issuer._thread.start()
        return issuer

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    # -- addresses and the registry side ------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def realm(self, host: str | None = None) -> str:
        """The token URL; `host` replaces 127.0.0.1:PORT (e.g. `localhost:PORT`, the same server by another name)."""
        return f"http://{host or self.host}/token"

    @property
    def rootcertbundle(self) -> Path:
        return self.signing_key.cert_path

    def auth_config(self, realm: str | None = None) -> dict:
        """The `auth:` section of a distribution config that trusts this issuer."""
        return {"token": {"realm": realm or self.realm(), "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.rootcertbundle)}}

    def rotate_key(self) -> None:
        """A new signing key and certificate (same files): tokens signed before stop verifying once
        the registry has re-read its rootcertbundle (restart it)."""
        self.signing_key = SigningKey(self.workdir, self.issuer)

    # -- what happened ------------------------------------------------------------------------

    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def mark(self) -> int:
        with self._lock:
            return len(self._requests)

    def requests_since(self, mark: int) -> list[TokenRequest]:
        with self._lock:
            return self._requests[mark:]

    def issued_tokens(self) -> list[str]:
        return [r.token for r in self.requests() if r.token]

    # -- issuing ------------------------------------------------------------------------------

    def token_for(self, username: str | None, scopes: list[str]) -> str:
        """A signed token granting `username` (None: nobody) the actions of `scopes`."""
        access = []
        if username is not None:
            for text in scopes:
                scope = Scope.parse(text)
                if scope is not None and scope.type == "repository":
                    access.append({"type": scope.type, "name": scope.name,
                                   "actions": [a for a in scope.actions if a in ("pull", "push")]})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": username or "", "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 1, "iat": now, "jti": secrets.token_hex(16), "access": access}
        return self.signing_key.jwt(claims)

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._requests.append(entry)


def _handler_for(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            service = query.get("service", [None])[0]
            scopes = tuple(query.get("scope", []))
            username, password = _basic_credentials(self.headers.get("Authorization"))
            token = None
            if url.path != "/token":
                status, body = 404, {"details": "not found"}
            elif service != issuer.service:
                status, body = 400, {"details": f"unknown service {service!r}"}
            elif username is not None and (username not in issuer.users or issuer.users[username] != password):
                status, body = 401, {"details": "incorrect username or password"}
            else:
                token = issuer.token_for(username, list(scopes))
                issued = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                status, body = 200, {"token": token, "access_token": token, "expires_in": issuer.expires_in,
                                     "issued_at": issued}
            issuer._record(TokenRequest("GET", url.path, service, scopes, username, status, token,
                                        self.headers.get("User-Agent", "")))
            self._send_json(status, body)

        def do_POST(self) -> None:  # noqa: N802
            # The OAuth2 form (refresh tokens) is not offered: clients fall back to GET on 404/405.
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            issuer._record(TokenRequest("POST", urlsplit(self.path).path, None, (), None, 405, None,
                                        self.headers.get("User-Agent", "")))
            self._send_json(405, {"details": "use GET"})

        def _send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="pullthrough-test-issuer"')
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the record in `issuer.requests()` is the log

    return Handler


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    """(username, password) from `Authorization: Basic ..`; (None, None) for anything else."""
    if not header:
        return None, None
    kind, _, value = header.partition(" ")
    if kind.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", None
    username, _, password = decoded.partition(":")
    return username, password
