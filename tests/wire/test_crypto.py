"""The SDK-compatible encryption: key agreement, AES-CBC payloads, msg_key."""

import base64
import hashlib
import string

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from node.wire.crypto import (
    CryptoError,
    Session,
    generate_keypair,
    msg_key_matches,
    public_key_b64,
    random_salt,
)

# Known answers produced by running the JS SDK's own code path (its curve25519-js, crypto-js
# and md5-typescript dependencies, driven the way connect_manager.ts, security.ts and proto.ts
# drive them) on these fixed inputs. The client seed is 32 ASCII characters, as the SDK uses.
CLIENT_SEED = b"0123456789abcdef0123456789abcdef"
SERVER_SEED = bytes((i * 7 + 3) & 0xFF for i in range(32))
CLIENT_PUBLIC = "hlF7wMOf6Ha3ZGy1407gPa9xzLrWdFDBapcK2MvAPn4="
SERVER_PUBLIC = "u1D/noKldM+/gg6X9g+5wUPsdBXPUU+M/Zjv9Z4FlhQ="
SHARED_B64 = "S7TABM3pja8f3vwc1IPoJ++NJa1cZsUarhp15tXGh0w="
SALT = "Zq3xY7pL0wN5vB2kEXTRA"  # longer than 16: the SDK keeps the first 16 characters
AES_KEY = b"db67526dfa47d064"
PAYLOAD = '{"content":"你好 hello","type":1}'.encode()
ENCRYPTED_PAYLOAD = b"GP9oniDQOiRuB1u2e71XMO06+XI/Vamvw+Fuxh4Ucgcj40UiBrfxWjlx+fncEuJC"
CLIENT_MSG_NO = "c0ffee00c0ffee00c0ffee00c0ffee001"
# SEND: client_seq 7 to channel "bob" of type 1.
SEND_MSG_KEY = "724c6c21ba24327bf7265b6ec04b3158"
# RECV: message_id 1234567890123456789, message_seq 42, timestamp 1700000000, from "alice"
# on channel "alice" of type 1.
RECV_MSG_KEY = "b9a9f9a74dac81eb3436858833fd3ef1"


def _vector_sessions() -> tuple[Session, Session]:
    client = X25519PrivateKey.from_private_bytes(CLIENT_SEED)
    server = X25519PrivateKey.from_private_bytes(SERVER_SEED)
    return (
        Session.from_keys(client, SERVER_PUBLIC, SALT),
        Session.from_keys(server, CLIENT_PUBLIC, SALT),
    )


def test_public_keys_match_the_sdk() -> None:
    assert public_key_b64(X25519PrivateKey.from_private_bytes(CLIENT_SEED)) == CLIENT_PUBLIC
    assert public_key_b64(X25519PrivateKey.from_private_bytes(SERVER_SEED)) == SERVER_PUBLIC


def test_both_sides_derive_the_sdk_key_and_iv() -> None:
    client, server = _vector_sessions()
    expected_key = hashlib.md5(SHARED_B64.encode()).hexdigest()[:16].encode()
    assert expected_key == AES_KEY
    assert client.aes_key == server.aes_key == AES_KEY
    assert client.iv == server.iv == SALT[:16].encode()


def test_payload_encryption_matches_the_sdk() -> None:
    client, server = _vector_sessions()
    assert client.encrypt(PAYLOAD) == ENCRYPTED_PAYLOAD
    assert server.decrypt(ENCRYPTED_PAYLOAD) == PAYLOAD


def test_send_msg_key_matches_the_sdk() -> None:
    client, server = _vector_sessions()
    for session in (client, server):
        assert session.send_msg_key(7, CLIENT_MSG_NO, "bob", 1, ENCRYPTED_PAYLOAD) == SEND_MSG_KEY
    sign = f"7{CLIENT_MSG_NO}bob1{ENCRYPTED_PAYLOAD.decode()}"
    assert client.msg_key(sign) == SEND_MSG_KEY


def test_recv_msg_key_matches_the_sdk() -> None:
    _, server = _vector_sessions()
    got = server.recv_msg_key(
        1234567890123456789, 42, CLIENT_MSG_NO, 1700000000, "alice", "alice", 1, ENCRYPTED_PAYLOAD
    )
    assert got == RECV_MSG_KEY


def test_msg_key_is_lowercase_hex_md5_of_the_ciphertext() -> None:
    client, _ = _vector_sessions()
    key = client.msg_key("anything")
    assert key == hashlib.md5(client.encrypt(b"anything")).hexdigest()
    assert len(key) == 32
    assert set(key) <= set("0123456789abcdef")


def test_msg_key_changes_with_every_signed_field() -> None:
    client, _ = _vector_sessions()
    base = (7, CLIENT_MSG_NO, "bob", 1, ENCRYPTED_PAYLOAD)
    variants = [
        (8, *base[1:]),
        (7, CLIENT_MSG_NO[:-1] + "2", *base[2:]),
        (7, CLIENT_MSG_NO, "bob2", 1, ENCRYPTED_PAYLOAD),
        (7, CLIENT_MSG_NO, "bob", 2, ENCRYPTED_PAYLOAD),
        (7, CLIENT_MSG_NO, "bob", 1, client.encrypt(b"other")),
    ]
    keys = {client.send_msg_key(*v) for v in variants}
    assert SEND_MSG_KEY not in keys
    assert len(keys) == len(variants)


def test_msg_key_matches_compares_exactly() -> None:
    assert msg_key_matches(SEND_MSG_KEY, SEND_MSG_KEY)
    assert not msg_key_matches(SEND_MSG_KEY, SEND_MSG_KEY.upper())
    assert not msg_key_matches(SEND_MSG_KEY, "")


def test_fresh_key_pairs_agree() -> None:
    client_private, client_public = generate_keypair()
    server_private, server_public = generate_keypair()
    assert len(base64.b64decode(client_public)) == 32
    assert client_public != server_public
    salt = random_salt()
    client = Session.from_keys(client_private, server_public, salt)
    server = Session.from_keys(server_private, client_public, salt)
    assert client.aes_key == server.aes_key
    assert server.decrypt(client.encrypt(b"ping")) == b"ping"
    assert client.decrypt(server.encrypt(b"pong")) == b"pong"


def test_random_salt_is_16_alphanumerics() -> None:
    salts = {random_salt() for _ in range(50)}
    assert len(salts) == 50
    for salt in salts:
        assert len(salt) == 16
        assert set(salt) <= set(string.ascii_letters + string.digits)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_encrypt_decrypt_round_trip(data: bytes) -> None:
    client, server = _vector_sessions()
    wire = client.encrypt(data)
    raw = base64.b64decode(wire, validate=True)
    # PKCS7 always pads, a whole block when the input is already aligned.
    assert len(raw) == (len(data) // 16 + 1) * 16
    assert server.decrypt(wire) == data


@settings(max_examples=50, deadline=None)
@given(messages=st.lists(st.binary(max_size=100), min_size=2, max_size=12))
def test_a_session_encrypts_every_message_as_a_fresh_cbc_context_would(messages: list[bytes]) -> None:
    """The session keeps one running context per direction; each message must still start from the IV."""
    client, server = _vector_sessions()
    for data in messages:
        pad = 16 - len(data) % 16
        fresh = Cipher(algorithms.AES(client.aes_key), modes.CBC(client.iv)).encryptor()
        expected = base64.b64encode(fresh.update(data + bytes((pad,)) * pad) + fresh.finalize())
        assert client.encrypt(data) == expected
        assert server.decrypt(expected) == data
        with pytest.raises(CryptoError):
            server.decrypt(_raw_cbc(server, b"A" * 16))  # a refused one in between changes nothing
    assert client.encrypt(PAYLOAD) == ENCRYPTED_PAYLOAD  # and the SDK's vector still holds after all that


def _raw_cbc(session: Session, plaintext: bytes) -> bytes:
    """Encrypt without padding, to build ciphertexts whose padding is wrong."""
    encryptor = Cipher(algorithms.AES(session.aes_key), modes.CBC(session.iv)).encryptor()
    return base64.b64encode(encryptor.update(plaintext) + encryptor.finalize())


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not base64!",
        b"QUJD",  # valid base64, 3 bytes: not a whole block
        base64.b64encode(b"x" * 17),
        "密文".encode(),
    ],
)
def test_decrypt_garbage_raises_crypto_error(garbage: bytes) -> None:
    client, _ = _vector_sessions()
    with pytest.raises(CryptoError):
        client.decrypt(garbage)


@pytest.mark.parametrize(
    "last_block",
    [
        b"A" * 16,  # pad byte 0x41 is over 16
        b"A" * 15 + b"\x00",  # pad byte 0 is never valid
        b"A" * 14 + b"\x01\x02",  # claims 2 bytes of padding, only one matches
    ],
)
def test_decrypt_bad_padding_raises_crypto_error(last_block: bytes) -> None:
    client, _ = _vector_sessions()
    with pytest.raises(CryptoError, match="padding"):
        client.decrypt(_raw_cbc(client, last_block))


def test_decrypt_with_the_wrong_key_fails_or_differs() -> None:
    client, _ = _vector_sessions()
    other = Session.from_keys(generate_keypair()[0], SERVER_PUBLIC, SALT)
    wire = client.encrypt(PAYLOAD)
    try:
        assert other.decrypt(wire) != PAYLOAD
    except CryptoError:
        pass


@pytest.mark.parametrize(
    ("peer", "salt"),
    [
        ("not base64!", SALT),
        (base64.b64encode(b"k" * 31).decode(), SALT),
        (base64.b64encode(bytes(32)).decode(), SALT),  # low-order point: all-zero secret
        (SERVER_PUBLIC, "short"),
        (SERVER_PUBLIC, "é" * 16),
    ],
)
def test_bad_peer_key_or_salt_raises_crypto_error(peer: str, salt: str) -> None:
    with pytest.raises(CryptoError):
        Session.from_keys(X25519PrivateKey.from_private_bytes(CLIENT_SEED), peer, salt)


def test_session_requires_16_byte_key_and_iv() -> None:
    with pytest.raises(CryptoError):
        Session(b"k" * 15, b"i" * 16)
    with pytest.raises(CryptoError):
        Session(b"k" * 16, b"i" * 17)
