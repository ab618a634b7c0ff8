"""Envelope encryption: the ciphers against published vectors, the blob format, and the keyring's keys in
a real JetStream KV bucket (creation, caching, data-key and master-key rotation)."""

import asyncio
import base64
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings
from kefu.shared.crypto import (
    AES_256_GCM,
    SM4_GCM,
    DecryptionFailed,
    Keyring,
    KeyUnavailable,
    aead,
    digest,
    generate_master_key,
    is_sealed,
    parse_master_key,
)
from kefu.shared.natsserver import NatsServer

MASTER_A = os.urandom(32)
MASTER_B = os.urandom(32)


def test_sm4_gcm_matches_rfc_8998():
    # RFC 8998, appendix A.1 (SM4-GCM test vector).
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    nonce = bytes.fromhex("00001234567800000000ABCD")
    ad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    plain = bytes.fromhex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
                          "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA")
    expected = bytes.fromhex("17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
                             "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
                             "83DE3541E4C2B58177E065A9BF7B62EC")
    cipher = aead(SM4_GCM, key)
    assert cipher.encrypt(nonce, plain, ad) == expected
    assert cipher.decrypt(nonce, expected, ad) == plain
    with pytest.raises(InvalidTag):
        cipher.decrypt(nonce, expected, ad + b"x")


def test_sm3_and_sha256_match_their_standards():
    # GB/T 32905 example 1 ("abc") and FIPS 180-2's SHA-256("abc").
    assert digest("sm3", b"abc").hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert digest("sha256", b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_master_keys_are_checked_at_start_up():
    assert len(parse_master_key(generate_master_key())) == 32
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            parse_master_key(bad)
    with pytest.raises(ValueError):
        KefuSettings(master_key="abc")
    s = KefuSettings(master_key=generate_master_key(), crypto="sm")
    assert Keyring.from_settings(None, s).enabled and Keyring.from_settings(None, s).suite == "sm"
    assert not Keyring.from_settings(None, KefuSettings(master_key="")).enabled


async def test_off_means_plaintext_and_sealed_data_is_refused_clearly():
    off = Keyring(None, None)
    assert await off.seal("acme", b"hello", "ctx") == b"hello"
    assert await off.open(b"\x0a\x02hi", "ctx") == b"\x0a\x02hi"  # data from before encryption reads as it is
    sealed = b"\x00KE\x01" + bytes(20)
    with pytest.raises(KeyUnavailable):
        await off.open(sealed, "ctx")


@pytest.mark.integration
@pytest.mark.parametrize("suite,algorithm", [("aes", AES_256_GCM), ("sm", SM4_GCM)])
async def test_seal_open_binds_tenant_and_context(bus, unique, suite, algorithm):
    ring = Keyring(bus.js, MASTER_A, suite=suite)
    tenant = unique("tenant")
    text = "我的订单 20261124001 还没到 / my order has not arrived".encode()
    blob = await ring.seal(tenant, text, f"conv/{tenant}/c1/3")
    assert is_sealed(blob) and text not in blob and Keyring.tenant_of(blob) == tenant
    assert await ring.open(blob, f"conv/{tenant}/c1/3") == text
    # Another replica (a fresh keyring, same master key) reads it from the KV bucket.
    other = Keyring(bus.js, MASTER_A, suite=suite)
    assert await other.open(blob, f"conv/{tenant}/c1/3") == text
    assert (await other.describe())  # lists tenants with their versions, no key material
    described = next(d for d in await other.describe() if d["tenant"] == tenant)
    assert described["keys"][0]["algorithm"] == algorithm and "wrapped" not in described["keys"][0]
    with pytest.raises(DecryptionFailed):
        await ring.open(blob, f"conv/{tenant}/c1/4")  # moved to another event
    tampered = bytearray(blob)
    tampered[-20] ^= 1
    with pytest.raises(DecryptionFailed):
        await ring.open(bytes(tampered), f"conv/{tenant}/c1/3")
    # A blob relabelled with another tenant's name does not open either (the header is authenticated).
    victim = unique("victim")
    await ring.seal(victim, b"x", "warm")
    relabelled = blob.replace(tenant.encode(), victim.encode())
    with pytest.raises(DecryptionFailed):
        await ring.open(relabelled, f"conv/{victim}/c1/3")
    with pytest.raises(KeyUnavailable):
        await Keyring(bus.js, MASTER_B, suite=suite).open(blob, f"conv/{tenant}/c1/3")


@pytest.mark.integration
async def test_concurrent_first_writes_of_a_tenant_agree_on_one_key(bus, unique):
    tenant = unique("new")
    rings = [Keyring(bus.js, MASTER_A) for _ in range(4)]
    blobs = await asyncio.gather(*(r.seal(tenant, b"same", "c") for r in rings for _ in range(5)))
    for blob in blobs:
        assert await rings[0].open(blob, "c") == b"same"
    assert {d["current"] for d in await rings[0].describe() if d["tenant"] == tenant} == {1}


@pytest.mark.integration
async def test_data_key_rotation_new_version_for_writes_old_ones_still_read(bus, unique):
    tenant = unique("rot")
    ring = Keyring(bus.js, MASTER_A)
    elsewhere = Keyring(bus.js, MASTER_A, refresh_s=0.0)  # another replica, that re-reads every time
    old = await ring.seal(tenant, b"before", "c")
    report = await elsewhere.rotate_data_keys([tenant])
    assert report.added == {tenant: 2}
    new = await elsewhere.seal(tenant, b"after", "c")
    assert new[5:9] == (2).to_bytes(4, "big") and old[5:9] == (1).to_bytes(4, "big")
    # ring's cache predates the rotation: it still opens version 2 (fetched on sight) and version 1.
    assert await ring.open(new, "c") == b"after" and await ring.open(old, "c") == b"before"


@pytest.fixture
async def private_bus(tmp_path):
    """A nats-server of the test's own: a master-key rotation goes over every tenant of the bucket."""
    with NatsServer(tmp_path / "js") as server:
        b = await Bus.connect([server.url], "crypto-test")
        yield b
        await b.close()


@pytest.mark.integration
async def test_master_key_rotation_rewraps_every_data_key(private_bus, unique):
    bus = private_bus
    tenants = [unique("m") for _ in range(3)]
    before = Keyring(bus.js, MASTER_A, suite="sm")
    blobs = {t: await before.seal(t, t.encode() * 3, "c") for t in tenants}
    await before.rotate_data_keys([tenants[0]])
    blobs["v2"] = await Keyring(bus.js, MASTER_A).seal(tenants[0], b"v2", "c")

    during = Keyring(bus.js, MASTER_B, [MASTER_A])
    report = await during.rotate_master()
    assert report.rewrapped >= 4 and report.tenants >= 3
    assert (await during.rotate_master()).rewrapped == 0  # run again: nothing left to re-wrap

    after = Keyring(bus.js, MASTER_B)  # the old key is gone from the configuration
    for t in tenants:
        assert await after.open(blobs[t], "c") == t.encode() * 3
    assert await after.open(blobs["v2"], "c") == b"v2"
    with pytest.raises(KeyUnavailable):
        await Keyring(bus.js, MASTER_A).open(blobs[tenants[1]], "c")

    # A tenant whose keys another, unknown master key wrapped is reported, and the others still rotate.
    stranger = unique("stranger")
    await Keyring(bus.js, os.urandom(32)).seal(stranger, b"x", "c")
    third = Keyring(bus.js, os.urandom(32), [MASTER_B])
    report = await third.rotate_master()
    assert list(report.failed) == [stranger] and "wrapped by master key" in report.failed[stranger]
    assert report.rewrapped == 4


def test_aes_gcm_of_the_keyring_is_the_standard_one():
    # NIST GCM test case 16 (AES-256, 96-bit IV, with AAD) through the same AEAD the keyring uses.
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex("cafebabefacedbaddecaf888")
    plain = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
                          "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
    ad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    out = aead(AES_256_GCM, key).encrypt(iv, plain, ad)
    assert out[-16:].hex() == "76fc6ece0f4e1768cddf8853bb2d551b"
    assert isinstance(aead(AES_256_GCM, key), AESGCM)
