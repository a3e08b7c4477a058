"""The payload encryption of the WuKongIM SDKs, bit for bit.

Checked against the JS SDK (src/connect_manager.ts, src/security.ts, src/proto.ts,
src/chat_manager.ts) and the libraries it calls (curve25519-js, crypto-js, md5-typescript):

- key agreement: X25519 between the client's and the server's per-connection key pairs;
- `aes_key` = the first 16 lowercase hex digits of MD5(base64(shared secret)), used as ASCII bytes;
- `iv` = the first 16 characters of the CONNACK salt, used as ASCII bytes;
- ciphertext = base64(AES-128-CBC-PKCS7(plaintext)); the base64 text itself is the wire payload;
- msg_key = lowercase hex MD5 of the base64 ciphertext of a "sign string" built from the packet.

This is what the SDKs interoperate with, not a design to copy: MD5 and a per-connection static
IV are weak, and msg_key only guards against accidental corruption.
"""

import base64
import binascii
import hashlib
import hmac
import secrets
import string
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES: Final = 16
IV_BYTES: Final = 16
SALT_CHARS: Final = 16
_BLOCK: Final = 16
_SALT_ALPHABET: Final = string.ascii_letters + string.digits


class CryptoError(Exception):
    """A key, ciphertext or padding that does not decode."""


def generate_keypair() -> tuple[X25519PrivateKey, str]:
    """A fresh X25519 private key and its public key as base64 (the CONNECT/CONNACK key field)."""
    private_key = X25519PrivateKey.generate()
    public = private_key.public_key().public_bytes_raw()
    return private_key, base64.b64encode(public).decode("ascii")


def public_key_b64(private_key: X25519PrivateKey) -> str:
    return base64.b64encode(private_key.public_key().public_bytes_raw()).decode("ascii")


def random_salt() -> str:
    """16 ASCII letters and digits: the CONNACK salt, whose characters are the AES IV."""
    return "".join(secrets.choice(_SALT_ALPHABET) for _ in range(SALT_CHARS))


def _md5_hex(data: bytes) -> str:
    # MD5 is the SDKs' choice, not a security primitive here; say so for FIPS builds.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Session:
    """The cipher state of one connection, identical on the client and the server side.

    Invariant: both sides derive the same `aes_key` and `iv`, since X25519 is symmetric and
    both read the same salt.
    """

    __slots__ = ("_decrypt_chain", "_decryptor", "_encrypt_chain", "_encryptor", "_iv_int", "aes_key", "iv")

    def __init__(self, aes_key: bytes, iv: bytes) -> None:
        if len(aes_key) != KEY_BYTES or len(iv) != IV_BYTES:
            raise CryptoError(f"need a {KEY_BYTES}-byte key and a {IV_BYTES}-byte IV")
        self.aes_key = aes_key
        self.iv = iv
        # Every message is CBC from the same IV. Making a Cipher and a context per message costs more
        # than the AES itself, so one encryptor and one decryptor run for the connection's life, and
        # each message is made to start from `iv` anyway: in CBC a block is chained with the previous
        # ciphertext block (`_*_chain`, the context's own state), so XOR-ing `chain ^ iv` into the
        # first block (or out of it, decrypting) gives exactly what a fresh context would.
        self._iv_int = int.from_bytes(iv, "big")
        self._encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
        self._encrypt_chain = self._iv_int
        self._decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
        self._decrypt_chain = self._iv_int

    @classmethod
    def from_keys(cls, private_key: X25519PrivateKey, peer_public_b64: str, salt: str) -> "Session":
        """The session between our `private_key` and the peer's base64 public key."""
        try:
            peer_raw = base64.b64decode(peer_public_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError(f"peer public key is not base64: {exc}") from None
        if len(peer_raw) != 32:
            raise CryptoError(f"peer public key is {len(peer_raw)} bytes, not 32")
        try:
            shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_raw))
        except ValueError as exc:
            # A low-order peer point yields an all-zero secret, which the library refuses.
            raise CryptoError(f"key exchange failed: {exc}") from None
        if len(salt) < IV_BYTES:
            raise CryptoError(f"salt has {len(salt)} characters, need at least {IV_BYTES}")
        try:
            iv = salt[:IV_BYTES].encode("ascii")
        except UnicodeEncodeError:
            raise CryptoError("salt is not ASCII") from None
        aes_key = _md5_hex(base64.b64encode(shared))[:KEY_BYTES].encode("ascii")
        return cls(aes_key, iv)

    def encrypt(self, data: bytes) -> bytes:
        """base64(AES-128-CBC-PKCS7(data)) as ASCII bytes: the wire form of a payload."""
        pad = _BLOCK - len(data) % _BLOCK
        # PKCS7 by hand: one concatenation is cheaper than a padder context per message.
        padded = data + bytes((pad,)) * pad
        first = int.from_bytes(padded[:_BLOCK], "big") ^ self._encrypt_chain ^ self._iv_int
        ciphertext = self._encryptor.update(first.to_bytes(_BLOCK, "big") + padded[_BLOCK:])
        self._encrypt_chain = int.from_bytes(ciphertext[-_BLOCK:], "big")
        return base64.b64encode(ciphertext)

    def decrypt(self, data: bytes) -> bytes:
        """Inverse of `encrypt`; CryptoError on bad base64, a bad length or bad padding."""
        try:
            ciphertext = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("ciphertext is not base64") from None
        if not ciphertext or len(ciphertext) % _BLOCK:
            raise CryptoError(f"ciphertext of {len(ciphertext)} bytes is not whole AES blocks")
        chained = self._decryptor.update(ciphertext)
        first = int.from_bytes(chained[:_BLOCK], "big") ^ self._decrypt_chain ^ self._iv_int
        self._decrypt_chain = int.from_bytes(ciphertext[-_BLOCK:], "big")
        padded = first.to_bytes(_BLOCK, "big") + chained[_BLOCK:]
        pad = padded[-1]
        if not 1 <= pad <= _BLOCK or padded[-pad:] != bytes((pad,)) * pad:
            raise CryptoError("bad PKCS7 padding")
        return padded[:-pad]

    def msg_key(self, sign_string: str) -> str:
        """hex(MD5(base64(AES-CBC(sign_string)))), lowercase like md5-typescript."""
        return _md5_hex(self.encrypt(sign_string.encode()))

    # The sign strings end with the wire payload. It is appended as bytes, as the Go SDK does:
    # for the base64 text the SDKs send that equals appending it as a string, and a garbage
    # payload from a peer yields a mismatching key instead of a UnicodeDecodeError.

    def send_msg_key(
        self,
        client_seq: int,
        client_msg_no: str,
        channel_id: str,
        channel_type: int,
        encrypted_payload: bytes,
    ) -> str:
        """msg_key of a SEND; `encrypted_payload` is the base64 text on the wire."""
        head = f"{client_seq}{client_msg_no}{channel_id}{channel_type}".encode()
        return _md5_hex(self.encrypt(head + encrypted_payload))

    def recv_msg_key(
        self,
        message_id: int,
        message_seq: int,
        client_msg_no: str,
        timestamp: int,
        from_uid: str,
        channel_id: str,
        channel_type: int,
        encrypted_payload: bytes,
    ) -> str:
        """msg_key of a RECV; `encrypted_payload` is the base64 text on the wire."""
        head = (
            f"{message_id}{message_seq}{client_msg_no}{timestamp}{from_uid}{channel_id}{channel_type}"
        ).encode()
        return _md5_hex(self.encrypt(head + encrypted_payload))


def msg_key_matches(expected: str, actual: str) -> bool:
    """Constant-time comparison of two msg_keys."""
    return hmac.compare_digest(expected.encode(), actual.encode())
