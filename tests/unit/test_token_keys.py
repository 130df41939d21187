"""Token verification: rotated secrets, identity providers' public keys, refused algorithms."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from realtime.auth import Authenticator, AuthError, load_public_keys, split_secrets

NEW, OLD = "n" * 40, "o" * 40


def claims(**extra):
    now = int(time.time())
    return {"sub": "ann", "name": "Ann", "roles": ["moderator"], "iat": now, "exp": now + 300, **extra}


def refused(auth, token, match):
    with pytest.raises(AuthError) as e:
        auth.verify_token(token)
    assert e.value.status == 401 and match in e.value.message, e.value.message


def pem_public(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_several_secrets_verify_and_the_first_signs():
    assert split_secrets(" %s , %s ," % (NEW, OLD)) == [NEW, OLD]
    auth = Authenticator(b"c" * 32, mode="token", jwt_secret="%s,%s" % (NEW, OLD))
    for secret in (NEW, OLD):  # a token under the old secret still works during the rotation
        ident = auth.verify_token(jwt.encode(claims(), secret, algorithm="HS256"))
        assert (ident.id, ident.roles, ident.guest) == ("ann", frozenset({"moderator"}), False)
    refused(auth, jwt.encode(claims(), "x" * 40, algorithm="HS256"), "Signature verification failed")
    minted = auth.make_token("bob", "Bob", [])
    assert jwt.decode(minted, NEW, algorithms=["HS256"])["sub"] == "bob"
    # Once the old secret is dropped, its tokens stop working.
    after = Authenticator(b"c" * 32, mode="token", jwt_secret=NEW)
    refused(after, jwt.encode(claims(), OLD, algorithm="HS256"), "Signature verification failed")
    # Expired is still told apart, whichever secret signed it.
    expired = jwt.encode(claims(exp=int(time.time()) - 10), OLD, algorithm="HS256")
    with pytest.raises(AuthError) as e:
        auth.verify_token(expired)
    assert e.value.expired and e.value.message == "token expired"


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def handmade(alg: str, payload: dict, secret: bytes | None) -> str:
    """A token built by hand, as an attacker would (PyJWT refuses to make these)."""
    signing = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + b"." + b64(json.dumps(payload).encode())
    sig = b64(hmac.new(secret, signing, hashlib.sha256).digest()) if secret is not None else b""
    return (signing + b"." + sig).decode()


def test_alg_none_and_unconfigured_algorithms_are_refused_before_any_key_is_tried(tmp_path):
    auth = Authenticator(b"c" * 32, mode="token", jwt_secret=NEW)
    refused(auth, handmade("none", claims(), None), "algorithm 'none' is not accepted here (accepted: HS256)")
    refused(auth, jwt.encode(claims(), NEW * 2, algorithm="HS512"), "algorithm 'HS512' is not accepted")
    refused(auth, "not.a.token", "invalid token")
    # With only an identity provider's RSA key, an HS256 token "signed" with that public key
    # (the algorithm-confusion attack) is refused: HS256 is not configured at all.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "idp.pem"
    path.write_bytes(pem_public(key))
    idp = Authenticator(b"c" * 32, mode="token", jwt_public_keys=load_public_keys(str(path)))
    forged = handmade("HS256", claims(), pem_public(key))
    refused(idp, forged, "algorithm 'HS256' is not accepted here (accepted: RS256)")
    refused(idp, handmade("none", claims(), None), "algorithm 'none' is not accepted")
    assert idp.verify_token(jwt.encode(claims(), key, algorithm="RS256")).id == "ann"


def test_rs256_and_es256_tokens_of_an_identity_provider(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "rsa.pem").write_bytes(pem_public(rsa_key))
    # A certificate works as well as a bare key (identity providers publish either).
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ec_key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2100, 1, 1)).sign(ec_key, hashes.SHA256()))
    (tmp_path / "ec.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keys = load_public_keys("%s, %s" % (tmp_path / "rsa.pem", tmp_path / "ec.pem"))
    auth = Authenticator(b"c" * 32, mode="token", jwt_public_keys=keys, audience="chat", issuer="https://idp")
    good = claims(aud="chat", iss="https://idp")
    assert auth.verify_token(jwt.encode(good, rsa_key, algorithm="RS256")).id == "ann"
    assert auth.verify_token(jwt.encode(good, ec_key, algorithm="ES256")).id == "ann"
    refused(auth, jwt.encode(good, other, algorithm="ES256"), "Signature verification failed")
    refused(auth, jwt.encode(claims(aud="billing", iss="https://idp"), ec_key, algorithm="ES256"), "Audience")
    refused(auth, jwt.encode(claims(aud="chat", iss="https://evil"), ec_key, algorithm="ES256"), "issuer")
    refused(auth, jwt.encode(claims(iss="https://idp"), ec_key, algorithm="ES256"), "aud")
    refused(auth, jwt.encode(good, NEW, algorithm="HS256"), "not accepted")


def test_unusable_key_files_stop_the_start_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        load_public_keys(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match="no PEM public key"):
        load_public_keys(str(tmp_path / "junk.pem"))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "weak.pem").write_bytes(pem_public(weak))
    with pytest.raises(ValueError, match="too weak"):
        load_public_keys(str(tmp_path / "weak.pem"))
    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "private.pem").write_bytes(private)
    with pytest.raises(ValueError, match="private.pem"):
        load_public_keys(str(tmp_path / "private.pem"))
    with pytest.raises(ValueError, match="--jwt_secret or --jwt_public_key"):
        Authenticator(b"c" * 32, mode="token")


def test_a_refresh_keeps_the_user_and_takes_the_new_expiry_and_roles():
    auth = Authenticator(b"c" * 32, mode="token", jwt_secret=NEW)
    first = auth.verify_token(auth.make_token("ann", "Ann", [], ttl=10))
    fresh = auth.refreshed(first, auth.make_token("ann", "Someone else", ["moderator"], ttl=600))
    assert (fresh.id, fresh.name, fresh.roles) == ("ann", "Ann", frozenset({"moderator"}))
    assert fresh.expires is not None and first.expires is not None and fresh.expires > first.expires + 500
    with pytest.raises(AuthError) as e:
        auth.refreshed(first, auth.make_token("bob", "Bob", []))
    assert e.value.status == 403
    with pytest.raises(AuthError) as e:
        Authenticator(b"c" * 32).refreshed(first, "x")
    assert e.value.status == 400
