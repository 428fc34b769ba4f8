"""Ed25519 keys and signatures for evaluation certificates and receipts (docs/design.md §14).

- A **signing key** is an Ed25519 private key: a PEM file (PKCS#8, as ``kgate eval keygen`` writes it, or
  as ``openssl genpkey -algorithm ed25519`` does) or, from the environment, the same PEM text or the 32-byte
  seed in base64. It signs with the ``cryptography`` package.
- A **public key** is written ``ed25519:<base64url of its 32 bytes>`` (``kgate eval pubkey`` prints it);
  its **key id** is the first 16 hex digits of the sha256 of those bytes, carried with every signature so
  that a verifier holding several keys knows which one to try.
- What is signed is the **canonical JSON** of a document: orjson with sorted keys and no spaces, the same
  rule as the audit chain's. A verifier re-serializes the parsed document and checks the signature over
  those bytes, so whitespace or key order in a stored file does not matter, but any changed value does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "Ed25519"
PUBLIC_PREFIX = "ed25519:"
SIGNING_KEY_ENV = "KGATE_EVAL_SIGNING_KEY"


class SigningError(Exception):
    """A key that cannot be read, or a signature that does not verify; the message says which and why."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SigningError("not base64url text") from None


def canonical_json(doc: Any) -> bytes:
    """The bytes a signature covers: orjson, sorted keys, no spaces."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class PublicKey:
    key: Ed25519PublicKey
    raw: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    @property
    def text(self) -> str:
        return PUBLIC_PREFIX + b64url(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        pub = self.key.public_key()
        return PublicKey(pub, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def generate() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def _private_from_bytes(data: bytes, where: str) -> SigningKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{where}: not a readable unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{where}: the key is not an Ed25519 key")
        return SigningKey(key)
    try:
        seed = base64.b64decode(text, validate=True) if b"-" not in text and b"_" not in text else unb64url(
            text.decode("ascii"))
    except (binascii.Error, ValueError, SigningError, UnicodeDecodeError):
        seed = b""
    if len(seed) != 32:
        raise SigningError(f"{where}: expected an Ed25519 private key as PEM or as its 32-byte seed in base64")
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


def load_signing_key(path: str | os.PathLike[str] | None = None, env: str = SIGNING_KEY_ENV) -> SigningKey:
    """The signing key from ``path`` when given, else from the environment variable ``env``."""
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SigningError(f"signing key {path}: cannot read: {exc.strerror or exc}") from None
        return _private_from_bytes(data, f"signing key {path}")
    value = os.environ.get(env, "")
    if not value:
        raise SigningError(f"no signing key: give --signing-key FILE or set {env} (kgate eval keygen makes one)")
    return _private_from_bytes(value.encode(), f"signing key from ${env}")


def parse_public_key(text: str, where: str = "public key") -> PublicKey:
    """``ed25519:<base64url>``, or a PEM public key's text."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{where}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{where}: the key is not an Ed25519 key")
        return PublicKey(key, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    if not text.startswith(PUBLIC_PREFIX):
        raise SigningError(f"{where}: expected 'ed25519:<base64url>' (as kgate eval pubkey prints it) or PEM")
    raw = unb64url(text[len(PUBLIC_PREFIX):])
    if len(raw) != 32:
        raise SigningError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return PublicKey(Ed25519PublicKey.from_public_bytes(raw), raw)


def load_public_key(value: str, where: str = "public key") -> PublicKey:
    """A public key given as its text or as a file holding it."""
    if not value.strip().startswith((PUBLIC_PREFIX, "-----BEGIN")):
        try:
            value = Path(value).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SigningError(f"{where}: {value!r} is neither a key nor a readable file ({exc})") from None
    return parse_public_key(value, where)


# ------------------------------------------------------------------------------------ signed JSON
def sign_document(doc: dict[str, Any], key: SigningKey) -> dict[str, str]:
    """The signature block of ``doc``: algorithm, key id, and the signature over its canonical JSON."""
    return {"alg": ALG, "key_id": key.public.key_id, "value": b64url(key.sign(canonical_json(doc)))}


def verify_document(doc: Any, signature: Any, keys: list[PublicKey]) -> PublicKey:
    """The key whose signature ``signature`` is over ``doc``; raises :class:`SigningError` naming why not."""
    if not isinstance(signature, dict) or signature.get("alg") != ALG or not isinstance(signature.get("value"), str):
        raise SigningError(f"the signature block is not an {ALG} signature")
    if not keys:
        raise SigningError("no public key to verify with")
    kid = signature.get("key_id")
    candidates = [k for k in keys if k.key_id == kid] or ([] if kid else keys)
    if not candidates:
        raise SigningError(f"signed by key {kid!r}, which is none of the {len(keys)} trusted key(s) "
                           f"({', '.join(k.key_id for k in keys)})")
    sig = unb64url(signature["value"])
    message = canonical_json(doc)
    for k in candidates:
        if k.verify(sig, message):
            return k
    raise SigningError("the signature does not match the document: it was altered after signing, or signed "
                       "by another key")


# --------------------------------------------------------------------------------- compact tokens
RECEIPT_TYP = "kgate-receipt"


def sign_compact(claims: dict[str, Any], key: SigningKey, typ: str = RECEIPT_TYP) -> str:
    """A JWS in compact serialization (RFC 7515) with ``alg: EdDSA`` (RFC 8037): any JOSE library verifies it
    with the public key."""
    header = {"alg": "EdDSA", "kid": key.public.key_id, "typ": typ}
    signing_input = f"{b64url(canonical_json(header))}.{b64url(canonical_json(claims))}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode('ascii')))}"


def verify_compact(token: str, keys: list[PublicKey], typ: str = RECEIPT_TYP) -> tuple[dict[str, Any], PublicKey]:
    """(claims, the key that signed them) of a compact JWS; raises :class:`SigningError` naming why not."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise SigningError("a receipt has three dot-separated parts (a compact JWS)")
    try:
        header = orjson.loads(unb64url(parts[0]))
        claims = orjson.loads(unb64url(parts[1]))
    except orjson.JSONDecodeError:
        raise SigningError("the receipt's header or claims are not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "EdDSA" or not isinstance(claims, dict):
        raise SigningError("the receipt is not an EdDSA JWS")
    if header.get("typ") != typ:
        raise SigningError(f"the token is a {header.get('typ')!r}, not a {typ!r}")
    kid = header.get("kid")
    candidates = [k for k in keys if k.key_id == kid] or ([] if kid else keys)
    if not candidates:
        raise SigningError(f"signed by key {kid!r}, which is none of the trusted keys")
    sig, message = unb64url(parts[2]), f"{parts[0]}.{parts[1]}".encode("ascii")
    for k in candidates:
        if k.verify(sig, message):
            return claims, k
    raise SigningError("the receipt's signature does not match: it was altered or signed by another key")
