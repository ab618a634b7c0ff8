"""Encryption at rest: envelope encryption with per-tenant data keys wrapped by a master key.

Each tenant has random data keys (AES-256-GCM by default; SM4-GCM with ``KEFU_CRYPTO=sm``), stored
wrapped (encrypted) by the master key ``KEFU_MASTER_KEY`` in KV bucket ``tenant_keys`` and cached in
memory once unwrapped. :meth:`Keyring.seal` encrypts a blob with the tenant's current data key;
:meth:`Keyring.open` decrypts one with whichever version sealed it. A sealed blob is::

    b"\\x00KE\\x01" | algorithm (1 byte) | key version (uint32) | tenant length (uint16) | tenant (UTF-8)
    | nonce (12 bytes) | ciphertext | tag (16 bytes)

and its associated data is the header plus a ``context`` string the caller derives from where the blob
lives (``conv/<tenant>/<conversation>/<seq>/<event id>``, ``media/<object name>``...), so a blob moved to
another conversation, event or tenant fails to decrypt instead of being read in the wrong place.

The leading zero byte is the format marker: no protobuf message, PNG or JPEG starts with it, so data
written before encryption was turned on is told apart and read as it is (:func:`is_sealed`).

Rotation without downtime:

- master key: run every replica with the new key in ``KEFU_MASTER_KEY`` and the old one in
  ``KEFU_MASTER_KEY_OLD``, then :meth:`Keyring.rotate_master` (``kefu keys rotate``) re-wraps every data
  key under the new one; then drop the old key. Data is never re-encrypted: only the data keys are.
- data keys: :meth:`Keyring.rotate_data_keys` (``kefu keys rotate --data-keys``) adds a version that new
  writes use (every replica within ``refresh_s``); the older versions stay to read what they sealed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import nats.js.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from kefu.proto.bus.v1 import events_pb2, security_pb2
from kefu.shared.bus import ensure_kv
from kefu.shared.errors import Internal, Unavailable
from kefu.shared.streams import tenant_keys_kv

Suite = Literal["aes", "sm"]

MAGIC = b"\x00KE\x01"
AES_256_GCM = "AES-256-GCM"
SM4_GCM = "SM4-GCM"
_ALG_IDS = {AES_256_GCM: 1, SM4_GCM: 2}
_ALG_NAMES = {v: k for k, v in _ALG_IDS.items()}
_SUITE_ALG = {"aes": AES_256_GCM, "sm": SM4_GCM}
_KEY_BYTES = {AES_256_GCM: 32, SM4_GCM: 16}
NONCE_BYTES = 12
TAG_BYTES = 16
MASTER_KEY_BYTES = 32
_HEAD = struct.Struct(">4sBIH")  # magic, algorithm, key version, tenant length


class KeyUnavailable(Unavailable):
    """Sealed data that this process cannot open: no master key configured, or not the one that wrapped
    the data key."""

    code = "key_unavailable"


class DecryptionFailed(Internal):
    """A sealed blob that does not authenticate: changed, truncated, or moved from where it was written."""

    code = "decryption_failed"


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is a blob written by :meth:`Keyring.seal` (else: plaintext from before encryption)."""
    return data[:4] == MAGIC


def digest(algorithm: str, data: bytes) -> bytes:
    """SHA-256 (``"sha256"``) or SM3 (``"sm3"``) of ``data``."""
    if algorithm == "sm3":
        h = hashes.Hash(hashes.SM3())
        h.update(data)
        return h.finalize()
    if algorithm == "sha256":
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown hash {algorithm!r}")


def hash_name(suite: Suite) -> str:
    """The hash of a crypto suite: sha256 for aes, sm3 for sm."""
    return "sm3" if suite == "sm" else "sha256"


class _SM4GCM:
    """SM4 in GCM mode (GB/T 36624, RFC 8998) through OpenSSL's SM4 and GCM, with AESGCM's interface."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(associated_data)
        return enc.update(data) + enc.finalize() + enc.tag

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        if len(data) < TAG_BYTES:
            raise InvalidTag()
        dec = Cipher(algorithms.SM4(self._key), modes.GCM(nonce, data[-TAG_BYTES:])).decryptor()
        dec.authenticate_additional_data(associated_data)
        return dec.update(data[:-TAG_BYTES]) + dec.finalize()


def aead(algorithm: str, key: bytes) -> AESGCM | _SM4GCM:
    """The AEAD cipher ``algorithm`` (AES-256-GCM or SM4-GCM) with ``key``."""
    if len(key) != _KEY_BYTES[algorithm]:
        raise ValueError(f"{algorithm} takes a {_KEY_BYTES[algorithm]}-byte key")
    return AESGCM(key) if algorithm == AES_256_GCM else _SM4GCM(key)


def parse_master_key(text: str) -> bytes:
    """The 32 bytes of a master key given as base64 (``KEFU_MASTER_KEY``).

    Raises:
        ValueError: not base64, or not 32 bytes.
    """
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 (make one with `kefu keys generate`)") from None
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"must be {MASTER_KEY_BYTES} bytes in base64, not {len(key)} (`kefu keys generate`)")
    return key


def generate_master_key() -> str:
    """A new random master key, base64 (what ``KEFU_MASTER_KEY`` takes)."""
    return base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).decode()


class MasterKey:
    """The key that wraps data keys. AES-256-GCM uses it as is; SM4-GCM a 128-bit key derived from it
    with HKDF-SM3."""

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"a master key is {MASTER_KEY_BYTES} bytes")
        self.id = hashlib.sha256(b"kefu master key id\x00" + key).hexdigest()[:16]
        sm4 = HKDF(hashes.SM3(), 16, salt=None, info=b"kefu master key wrap SM4-GCM").derive(key)
        self._ciphers = {AES_256_GCM: AESGCM(key), SM4_GCM: _SM4GCM(sm4)}

    @staticmethod
    def _ad(tenant: str, version: int, algorithm: str) -> bytes:
        return b"kefu-dek\x00" + tenant.encode() + b"\x00" + struct.pack(">IB", version, _ALG_IDS[algorithm])

    def wrap(self, tenant: str, version: int, algorithm: str, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._ciphers[algorithm].encrypt(nonce, key, self._ad(tenant, version, algorithm))

    def unwrap(self, tenant: str, version: int, algorithm: str, wrapped: bytes) -> bytes:
        try:
            return self._ciphers[algorithm].decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                                    self._ad(tenant, version, algorithm))
        except InvalidTag:
            raise DecryptionFailed(f"data key {version} of tenant {tenant!r} does not unwrap with master key "
                                   f"{self.id}: changed, or wrapped by another key") from None


@dataclass
class _Tenant:
    """A tenant's unwrapped data keys, as cached."""

    current: int
    keys: dict[int, tuple[str, AESGCM | _SM4GCM]]
    fetched: float = field(default_factory=time.monotonic)


@dataclass
class RotationReport:
    """What a rotation changed: tenants seen, data keys re-wrapped (master) or added (data keys), and the
    tenants it could not rotate, with why (a data key wrapped by a master key this keyring lacks)."""

    tenants: int = 0
    rewrapped: int = 0
    already: int = 0
    added: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Keyring:
    """Seals and opens blobs with per-tenant data keys (see the module docstring).

    Args:
        js: JetStream, for KV bucket ``tenant_keys``.
        master_key: The master key's 32 bytes; None: encryption off (:meth:`seal` returns data as is,
            :meth:`open` reads unsealed data and refuses sealed data with :class:`KeyUnavailable`).
        old_master_keys: Keys that may still wrap data keys during a master-key rotation (read only).
        suite: ``aes`` (AES-256-GCM) or ``sm`` (SM4-GCM) for the data keys this keyring creates.
        refresh_s: How long a tenant's current version is trusted before it is read again (so a data-key
            rotation made elsewhere reaches this replica's writes).
    """

    def __init__(self, js: JetStreamContext | None, master_key: bytes | None,
                 old_master_keys: Iterable[bytes] = (), *, suite: Suite = "aes", refresh_s: float = 30.0) -> None:
        self.js = js
        self.master = MasterKey(master_key) if master_key is not None else None
        self.old = [MasterKey(k) for k in old_master_keys if k != master_key]
        self.suite: Suite = suite
        self.refresh_s = refresh_s
        self._kv: KeyValue | None = None
        self._tenants: dict[str, _Tenant] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_settings(cls, js: JetStreamContext | None, settings: object) -> Keyring:
        """The keyring of a service's settings (``KEFU_MASTER_KEY``, ``KEFU_MASTER_KEY_OLD``, ``KEFU_CRYPTO``)."""
        master = getattr(settings, "master_key", None)
        old = getattr(settings, "master_key_old", None)
        master_text = master.get_secret_value() if master is not None else ""
        old_text = old.get_secret_value() if old is not None else ""
        return cls(js, parse_master_key(master_text) if master_text else None,
                   [parse_master_key(k) for k in old_text.split(",") if k.strip()],
                   suite=getattr(settings, "crypto", "aes"))

    @property
    def enabled(self) -> bool:
        """Whether new data is sealed."""
        return self.master is not None

    # Sealing

    async def seal(self, tenant: str, data: bytes, context: str) -> bytes:
        """``data`` sealed with ``tenant``'s current data key and bound to ``context``; ``data`` itself when
        encryption is off."""
        if self.master is None:
            return data
        keys = self._tenants.get(tenant)
        if keys is None or time.monotonic() - keys.fetched > self.refresh_s:
            keys = await self._load(tenant, create=True)
        algorithm, cipher = keys.keys[keys.current]
        tenant_bytes = tenant.encode()
        header = _HEAD.pack(MAGIC, _ALG_IDS[algorithm], keys.current, len(tenant_bytes)) + tenant_bytes
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + cipher.encrypt(nonce, data, header + b"\x00" + context.encode())

    async def open(self, data: bytes, context: str) -> bytes:
        """The plaintext of a blob :meth:`seal` wrote with the same ``context``; unsealed data as it is.

        Raises:
            KeyUnavailable: sealed, and no master key here opens its data key.
            DecryptionFailed: sealed, but changed or written for another context.
        """
        if not is_sealed(data):
            return data
        try:
            _, alg_id, version, n = _HEAD.unpack_from(data)
            tenant = data[_HEAD.size:_HEAD.size + n].decode()
        except (struct.error, UnicodeDecodeError):
            raise DecryptionFailed("a sealed blob with a malformed header") from None
        start = _HEAD.size + n
        header, nonce, body = data[:start], data[start:start + NONCE_BYTES], data[start + NONCE_BYTES:]
        if self.master is None and not self.old:
            raise KeyUnavailable("this data is encrypted at rest and no KEFU_MASTER_KEY is set")
        keys = self._tenants.get(tenant)
        if keys is None or version not in keys.keys:
            keys = await self._load(tenant, create=False, version=version)
        if version not in keys.keys:
            raise KeyUnavailable(f"tenant {tenant!r} has no data key version {version}")
        algorithm, cipher = keys.keys[version]
        if _ALG_NAMES.get(alg_id) != algorithm:
            raise DecryptionFailed("a sealed blob names another algorithm than its key's")
        try:
            return cipher.decrypt(nonce, body, header + b"\x00" + context.encode())
        except InvalidTag:
            raise DecryptionFailed(f"sealed data of tenant {tenant!r} does not authenticate at {context!r}: "
                                   "changed, or moved from where it was written") from None

    @staticmethod
    def tenant_of(data: bytes) -> str | None:
        """The tenant a sealed blob belongs to (None for unsealed data)."""
        if not is_sealed(data) or len(data) < _HEAD.size:
            return None
        n = _HEAD.unpack_from(data)[3]
        return data[_HEAD.size:_HEAD.size + n].decode(errors="replace")

    # Keys

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            if self.js is None:
                raise KeyUnavailable("no JetStream to keep the tenant keys in")
            self._kv = await ensure_kv(self.js, tenant_keys_kv())
        return self._kv

    async def _load(self, tenant: str, *, create: bool, version: int | None = None) -> _Tenant:
        """Read ``tenant``'s keys (creating the first one when ``create``), unwrap and cache them."""
        lock = self._loading.setdefault(tenant, asyncio.Lock())
        async with lock:  # one read per tenant at a time: concurrent turns of a new tenant wait for it
            cached = self._tenants.get(tenant)
            if (cached is not None and time.monotonic() - cached.fetched < 0.5
                    and (version is None or version in cached.keys)):
                return cached  # read by the turn that held the lock before us
            kv = await self._bucket()
            record, _ = await self._record(kv, tenant)
            if record is None and create:
                record = await self._create(kv, tenant)
            if record is None:
                raise KeyUnavailable(f"tenant {tenant!r} has no data keys")
            keys = {}
            for k in record.keys:
                keys[k.version] = (k.algorithm, aead(k.algorithm, self._unwrap(tenant, k)))
            loaded = _Tenant(record.current, keys)
            self._tenants[tenant] = loaded
            return loaded

    @staticmethod
    async def _record(kv: KeyValue, tenant: str) -> tuple[security_pb2.TenantKeys | None, int]:
        try:
            entry = await kv.get(tenant, validate_keys=False)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, entry.revision or 0
        return security_pb2.TenantKeys.FromString(entry.value), entry.revision or 0

    def _unwrap(self, tenant: str, key: security_pb2.DataKey) -> bytes:
        masters = [m for m in (self.master, *self.old) if m is not None]
        for master in sorted(masters, key=lambda m: m.id != key.master_key_id):
            if master.id == key.master_key_id:
                return master.unwrap(tenant, key.version, key.algorithm, key.wrapped)
        known = ", ".join(m.id for m in masters) or "none"
        raise KeyUnavailable(f"data key {key.version} of tenant {tenant!r} is wrapped by master key "
                             f"{key.master_key_id}; this process has {known} (set KEFU_MASTER_KEY_OLD during a "
                             "rotation)")

    def _new_key(self, tenant: str, version: int) -> security_pb2.DataKey:
        assert self.master is not None
        algorithm = _SUITE_ALG[self.suite]
        raw = secrets.token_bytes(_KEY_BYTES[algorithm])
        return security_pb2.DataKey(version=version, algorithm=algorithm,
                                    wrapped=self.master.wrap(tenant, version, algorithm, raw),
                                    master_key_id=self.master.id, created_ms=int(time.time() * 1000))

    async def _create(self, kv: KeyValue, tenant: str) -> security_pb2.TenantKeys:
        record = security_pb2.TenantKeys(tenant=tenant, current=1, keys=[self._new_key(tenant, 1)])
        try:
            await kv.create(tenant, record.SerializeToString(), validate_keys=False)
            return record
        except nats.js.errors.KeyWrongLastSequenceError:
            found, _ = await self._record(kv, tenant)  # another replica created it first: use theirs
            assert found is not None
            return found

    async def tenants(self) -> list[str]:
        """Every tenant that has data keys."""
        kv = await self._bucket()
        try:
            return sorted(await kv.keys())
        except nats.js.errors.NoKeysError:
            return []

    async def describe(self) -> list[dict[str, object]]:
        """Per tenant: current version and each key's version, algorithm and master key id (no key material)."""
        kv = await self._bucket()
        out = []
        for tenant in await self.tenants():
            record, _ = await self._record(kv, tenant)
            if record is not None:
                out.append({"tenant": tenant, "current": record.current, "keys": [
                    {"version": k.version, "algorithm": k.algorithm, "master_key_id": k.master_key_id,
                     "created_ms": k.created_ms} for k in record.keys]})
        return out

    async def _update(self, tenant: str, change: object) -> tuple[security_pb2.TenantKeys, int]:
        """Apply ``change(record) -> count`` to ``tenant``'s record with compare-and-set (other replicas may
        change it at the same time); the record written and the count."""
        kv = await self._bucket()
        for _ in range(20):
            record, revision = await self._record(kv, tenant)
            if record is None:
                raise KeyUnavailable(f"tenant {tenant!r} has no data keys")
            count = change(record)  # type: ignore[operator]
            if not count:
                return record, 0
            try:
                await kv.update(tenant, record.SerializeToString(), last=revision, validate_keys=False)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self._tenants.pop(tenant, None)
            return record, count
        raise Unavailable(f"the keys of tenant {tenant!r} keep changing; try again", code="concurrent_update")

    async def rotate_master(self) -> RotationReport:
        """Re-wrap every data key that another master key wrapped under this keyring's master key. Safe to
        run again (what is already re-wrapped is left) and while the services run. A tenant whose keys
        this keyring cannot unwrap is left as it is and named in ``failed``; the others are rotated.

        Raises:
            KeyUnavailable: no master key.
        """
        master = self.master
        if master is None:
            raise KeyUnavailable("set KEFU_MASTER_KEY (the new key) and KEFU_MASTER_KEY_OLD (the old one)")
        report = RotationReport()
        for tenant in await self.tenants():
            def rewrap(record: security_pb2.TenantKeys, tenant: str = tenant) -> int:
                changed = 0
                for k in record.keys:
                    if k.master_key_id != master.id:
                        raw = self._unwrap(tenant, k)
                        k.wrapped, k.master_key_id = master.wrap(tenant, k.version, k.algorithm, raw), master.id
                        changed += 1
                return changed

            try:
                record, changed = await self._update(tenant, rewrap)
            except (KeyUnavailable, DecryptionFailed) as exc:
                report.failed[tenant] = exc.message
                continue
            report.tenants += 1
            report.rewrapped += changed
            report.already += len(record.keys) - changed
        return report

    async def rotate_data_keys(self, tenants: Iterable[str] | None = None) -> RotationReport:
        """A new data key version for each of ``tenants`` (default: every tenant) that new writes use from
        now on; the older versions stay to read older data."""
        if self.master is None:
            raise KeyUnavailable("encryption at rest is off: set KEFU_MASTER_KEY")
        report = RotationReport()
        for tenant in (list(tenants) if tenants is not None else await self.tenants()):
            kv = await self._bucket()
            if (await self._record(kv, tenant))[0] is None:
                report.added[tenant] = (await self._load(tenant, create=True)).current  # its first key
                report.tenants += 1
                continue

            def add(record: security_pb2.TenantKeys, tenant: str = tenant) -> int:
                version = max((k.version for k in record.keys), default=0) + 1
                record.keys.append(self._new_key(tenant, version))
                record.current = version
                return version

            _, version = await self._update(tenant, add)
            report.tenants += 1
            report.added[tenant] = version
        return report


# Conversation events (stream CONV): the header in clear, the body sealed


def event_context(pb: events_pb2.Event) -> str:
    """What a sealed event body is bound to: its tenant, conversation, seq and id."""
    return f"conv/{pb.tenant}/{pb.conversation_id}/{pb.seq}/{pb.id}"


async def seal_event(keyring: Keyring, pb: events_pb2.Event) -> events_pb2.Event:
    """``pb`` with its body sealed (``sealed`` set instead); ``pb`` itself when encryption is off."""
    kind = pb.WhichOneof("body")
    if not keyring.enabled or kind is None or kind == "sealed":
        return pb
    body = events_pb2.Event()
    getattr(body, kind).CopyFrom(getattr(pb, kind))
    getattr(body, kind).SetInParent()  # an empty body (a start without visitor id) is still a body
    out = events_pb2.Event(id=pb.id, conversation_id=pb.conversation_id, tenant=pb.tenant, seq=pb.seq,
                           ts_ms=pb.ts_ms, writer=pb.writer, lamport=pb.lamport)
    out.sealed = await keyring.seal(pb.tenant, body.SerializeToString(), event_context(pb))
    return out


async def open_event(keyring: Keyring, pb: events_pb2.Event) -> events_pb2.Event:
    """``pb`` with its sealed body opened in place (events written in clear are returned as they are).

    Raises:
        KeyUnavailable, DecryptionFailed: see :meth:`Keyring.open`.
    """
    if pb.WhichOneof("body") != "sealed":
        return pb
    body = events_pb2.Event.FromString(await keyring.open(pb.sealed, event_context(pb)))
    pb.MergeFrom(body)  # sets the body, which clears ``sealed`` (one of)
    return pb
