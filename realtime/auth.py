"""Who is on the other end of a socket.

Two modes:

* ``open`` (default): guests.  A guest keeps one identity across reconnects and
  tabs through a *session*: an HMAC-signed ``id|name|issued`` string that the
  pages set as the ``rt_session`` cookie and that every ``welcome`` message
  returns, so a non-browser client can pass it back as ``?session=``.  The name
  comes from ``?name=`` (validated) or the session, else ``guest-XXXX``.
* ``token``: a signed JWT (``exp`` and ``sub`` required) from ``?token=`` or
  ``Authorization: Bearer``; claims ``sub`` (user id), ``name``, ``roles``.
  A handshake without a valid token is refused with HTTP 401 (expired: 401 too,
  with a reason the client can act on).  Tokens are HS256 under one of the
  ``--jwt_secret`` secrets (several: rotation, the first is the one to sign
  with), or RS256/ES256 under a ``--jwt_public_key`` (an identity provider's).
  The token header's ``alg`` must be one of those configured: ``none`` and
  every other algorithm are refused before any key is tried, so a public key
  can never be used as an HMAC secret.

Security caveat: the session is a bearer credential for a *guest* name only; it
proves nothing about a real person.  Use token mode where identity matters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any

NAME_MAX = 32
MIN_JWT_SECRET = 32  # bytes: RFC 7518 3.2 asks for a key at least as long as the hash (256 bits)
log = logging.getLogger("realtime.auth")


def load_or_create_secret(path: str) -> str:
    """The secret stored at ``path``; a new random one (file mode 0600) if the
    file is absent or empty.  Used for the cookie secret and the ingest key."""
    try:
        with open(path, encoding="ascii") as f:
            secret = f.read().strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret + "\n")
    return secret


def split_secrets(value: str) -> list[str]:
    """``--jwt_secret``: one secret, or several separated by commas (a
    rotation: tokens under any of them are accepted, the first signs)."""
    return [p.strip() for p in value.split(",") if p.strip()]


def load_public_keys(paths: str) -> list[Any]:
    """The public keys in ``--jwt_public_key`` (PEM files, comma separated;
    a file may hold several keys or certificates).  ``ValueError`` says which
    file is unusable and why."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys: list[Any] = []
    for path in (p.strip() for p in paths.split(",") if p.strip()):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError("--jwt_public_key %s: %s" % (path, e.strerror)) from None
        blocks = list(re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", data, re.S))
        if not blocks:
            raise ValueError("--jwt_public_key %s: no PEM public key or certificate in it" % path)
        for block in blocks:
            try:
                key = (x509.load_pem_x509_certificate(block.group(0)).public_key()
                       if block.group(1) == b"CERTIFICATE" else load_pem_public_key(block.group(0)))
                key_algorithm(key)
            except (ValueError, UnsupportedAlgorithm) as e:
                raise ValueError("--jwt_public_key %s: %s" % (path, e)) from None
            keys.append(key)
    return keys


def key_algorithm(key: Any) -> str:
    """The one JWT algorithm a public key verifies: RS256 for RSA, ES256 for
    EC P-256, ES384 for P-384 (anything else is a ``ValueError``)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("an RSA key of %d bits is too weak (at least 2048)" % key.key_size)
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name)
        if curve is not None:
            return curve
        raise ValueError("EC keys on curve %s are not supported (P-256 or P-384)" % key.curve.name)
    raise ValueError("a %s is not an RSA or EC public key" % type(key).__name__)


class AuthError(Exception):
    """Refuses a handshake: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.expired = expired


@dataclass(frozen=True)
class Identity:
    id: str
    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    guest: bool = True
    expires: float | None = None  # unix time a token expires, if any

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}

    def can(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


def clean_name(raw: str | None) -> str | None:
    """A display name: trimmed, NFC, 1-32 characters, no control characters.
    Returns ``None`` for anything unusable."""
    if not raw:
        return None
    name = unicodedata.normalize("NFC", raw).strip()
    if not name or len(name) > NAME_MAX:
        return None
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        return None
    return name


_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


def valid_user_id(s: object) -> bool:
    """A user id as tokens and sessions carry them: 1-64 of ``A-Z a-z 0-9 _ . : @ -``."""
    return isinstance(s, str) and bool(_ID_RE.match(s))


class Signer:
    """HMAC-SHA256 over a short text; output is URL-safe."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, text: str) -> str:
        body = base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")
        mac = hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest()[:18]
        return body + "." + base64.urlsafe_b64encode(mac).decode("ascii")

    def verify(self, signed: str) -> str | None:
        body, _, mac = signed.partition(".")
        if not body or not mac:
            return None
        want = hmac.new(self._secret, body.encode("ascii", "replace"), hashlib.sha256).digest()[:18]
        try:
            got = base64.urlsafe_b64decode(mac.encode("ascii"))
            text = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("utf-8")
        except (ValueError, UnicodeError):
            return None
        if not hmac.compare_digest(want, got):
            return None
        return text


class Authenticator:
    def __init__(
        self,
        secret: bytes,
        *,
        mode: str = "open",
        jwt_secret: str = "",
        session_max_age: float = 30 * 86400,
        guest_roles: frozenset[str] = frozenset({"chat", "edit"}),
        max_token_lifetime: float = 86400.0,
        jwt_public_keys: list[Any] | None = None,
        audience: str = "",
        issuer: str = "",
    ) -> None:
        if mode not in ("open", "token"):
            raise ValueError("auth mode must be 'open' or 'token'")
        self.jwt_secrets = split_secrets(jwt_secret)
        # algorithm -> the keys that verify it
        self.keys: dict[str, list[Any]] = {"HS256": list(self.jwt_secrets)} if self.jwt_secrets else {}
        for key in jwt_public_keys or []:
            self.keys.setdefault(key_algorithm(key), []).append(key)
        if mode == "token" and not self.keys:
            raise ValueError("token mode needs --jwt_secret or --jwt_public_key")
        for s in self.jwt_secrets if mode == "token" else []:
            if len(s.encode("utf-8")) < MIN_JWT_SECRET:
                log.warning("a --jwt_secret is %d bytes: anyone holding one token can guess it offline and mint "
                            "their own; use at least %d random bytes", len(s.encode("utf-8")), MIN_JWT_SECRET)
        self.max_token_lifetime = max_token_lifetime
        self.mode = mode
        self.signer = Signer(secret)
        self.jwt_secret = self.jwt_secrets[0] if self.jwt_secrets else ""  # the one make_token signs with
        self.audience = audience
        self.issuer = issuer
        self.session_max_age = session_max_age
        self.guest_roles = guest_roles

    # -- guests ----------------------------------------------------------

    def new_guest(self, name: str | None = None) -> Identity:
        gid = "g-" + secrets.token_hex(6)
        return Identity(gid, name or "guest-" + gid[-4:], self.guest_roles)

    def session_for(self, ident: Identity) -> str:
        return self.signer.sign("%s|%s|%d" % (ident.id, ident.name, int(time.time())))

    def from_session(self, session: str | None) -> Identity | None:
        if not session:
            return None
        text = self.signer.verify(session)
        if text is None:
            return None
        parts = text.split("|")
        if len(parts) != 3 or not _ID_RE.match(parts[0]):
            return None
        try:
            issued = int(parts[2])
        except ValueError:
            return None
        if time.time() - issued > self.session_max_age:
            return None
        name = clean_name(parts[1])
        if name is None:
            return None
        return Identity(parts[0], name, self.guest_roles)

    # -- handshake -------------------------------------------------------

    def identify(self, *, name: str | None, session: str | None, token: str | None) -> Identity:
        """The identity for a handshake, or :class:`AuthError`."""
        if self.mode == "token":
            if not token:
                raise AuthError(401, "a token is required (?token= or Authorization: Bearer)")
            return self.verify_token(token)
        if name is not None and clean_name(name) is None:
            raise AuthError(400, "name must be 1-%d characters without control characters" % NAME_MAX)
        wanted = clean_name(name)
        ident = self.from_session(session)
        if ident is None:
            return self.new_guest(wanted)
        if wanted and wanted != ident.name:
            ident = Identity(ident.id, wanted, ident.roles)
        return ident

    def verify_token(self, token: str) -> Identity:
        """The identity a token proves, or :class:`AuthError` (401)."""
        import jwt  # PyJWT; only needed in token mode

        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as e:
            raise AuthError(401, "invalid token: %s" % e)
        keys = self.keys.get(alg) if isinstance(alg, str) else None
        if not keys or not isinstance(alg, str):
            raise AuthError(401, "invalid token: algorithm %r is not accepted here (accepted: %s)"
                            % (str(alg)[:20], ", ".join(sorted(self.keys)) or "none"))
        claims: dict[str, Any] | None = None
        for key in keys:  # several secrets or keys: during a rotation, a token under any of them counts
            try:
                claims = jwt.decode(token, key, algorithms=[alg], options={"require": ["exp", "sub"]},
                                    audience=self.audience or None, issuer=self.issuer or None)
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError(401, "token expired", expired=True)
            except jwt.InvalidTokenError as e:
                raise AuthError(401, "invalid token: %s" % e)
        if claims is None:
            raise AuthError(401, "invalid token: Signature verification failed")
        if self.max_token_lifetime > 0 and float(claims["exp"]) - time.time() > self.max_token_lifetime:
            raise AuthError(401, "invalid token: it expires more than %g seconds from now (--max_token_lifetime)"
                            % self.max_token_lifetime)
        sub = str(claims.get("sub", ""))
        if not _ID_RE.match(sub):
            raise AuthError(401, "invalid token: bad 'sub'")
        name = clean_name(str(claims.get("name") or sub)) or sub[:NAME_MAX]
        roles = claims.get("roles") or []
        if not isinstance(roles, list):
            raise AuthError(401, "invalid token: 'roles' must be a list")
        return Identity(sub, name, frozenset(str(r) for r in roles), guest=False,
                        expires=float(claims["exp"]))

    def refreshed(self, current: Identity, token: str) -> Identity:
        """The identity of an open connection after it presented a fresh token
        (the ``refresh`` message): the same user, the new token's expiry and
        roles.  :class:`AuthError` 401 for a bad token, 403 for another user's."""
        if self.mode != "token":
            raise AuthError(400, "this server does not use tokens (--auth=open)")
        fresh = self.verify_token(token)
        if fresh.id != current.id:
            raise AuthError(403, "the token is for another user (%s)" % fresh.id)
        return Identity(current.id, current.name, fresh.roles, guest=False, expires=fresh.expires)

    def make_token(self, sub: str, name: str, roles: list[str], ttl: float = 3600) -> str:
        """Mint a token (for tests, the CLI and admin tooling)."""
        import jwt

        now = int(time.time())
        return jwt.encode(
            {"sub": sub, "name": name, "roles": roles, "iat": now, "exp": now + int(ttl)},
            self.jwt_secret,
            algorithm="HS256",
        )
