"""Tenants, their API keys and quotas in etcd: the controller's store and the routers' view.

Layout under the registry prefix ``P`` (the only module that knows these keys)::

    P/tenants/<name>    Tenant JSON: description, created, quotas per tier name (persistent)
    P/apikeys/<key_id>  ApiKey JSON: tenant, sha256 of the secret, created, revoked, internal (persistent)

Only the controller writes them (``TenantStore``). Routers keep both prefixes, and the live
routers of ``P/routers/``, in memory (``TenancyView``: a snapshot, then a watch from the
snapshot's revision), so authenticating a request and checking its quota read no etcd.

An API key is ``kvf_<key_id>_<secret>``: ``key_id`` is 12 hex digits, public (it names the
key in ``tenants keys list`` and in error messages); ``secret`` is 32 bytes from
``secrets`` (43 URL-safe characters), shown once at creation and stored only as its sha256.
A plain hash is enough for 256 random bits (no dictionary to try); it is compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import weakref
from pathlib import Path
from typing import Callable, Generic, TypeVar

import pydantic
from etcd3aio import prefix_range_end

from kvfleet.aio import cancel_and_wait
from kvfleet.controller.registry import Registry, RouterEntry

log = logging.getLogger(__name__)

# kvfleet.v1.Tier values (common.proto); TIER_AUTO (0) means default. A unit test checks
# that they match the generated enum (core modules do not import generated code).
TIER_NAMES: dict[int, str] = {1: "priority", 2: "default", 3: "flex", 4: "batch"}
TIER_VALUES: dict[str, int] = {v: k for k, v in TIER_NAMES.items()}

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
RESERVED_PREFIX = "kvfleet-"           # names kvfleet creates for itself
SERVICE_TENANT = "kvfleet-batch"       # the tenant of the Batch API runner's own key
SERVICE_KEY_FILE = "batch-runner.key"  # under the controller's data dir, mode 0600

KEY_PREFIX = "kvf_"
KEY_ID_HEX = 12
SECRET_BYTES = 32
_KEY = re.compile(r"kvf_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def now_ms() -> int:
    return int(time.time() * 1000)


class AlreadyExists(Exception):
    """gRPC ALREADY_EXISTS."""


class NotFound(Exception):
    """gRPC NOT_FOUND."""


class InvalidArgument(ValueError):
    """gRPC INVALID_ARGUMENT."""


# -- records -------------------------------------------------------------------------------------
class TierQuota(pydantic.BaseModel):
    """One tier's limits; 0 is unlimited."""

    requests_per_min: int = pydantic.Field(0, ge=0, description="requests in any sliding 60 s window")
    tokens_per_min: int = pydantic.Field(0, ge=0, description="prompt + completion tokens in any sliding 60 s window")
    concurrent: int = pydantic.Field(0, ge=0, description="requests admitted and not yet finished")

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_min or self.tokens_per_min or self.concurrent)


class Tenant(pydantic.BaseModel):
    name: str
    description: str = ""
    created_unix_ms: int
    quotas: dict[str, TierQuota] = {}  # tier name -> limits; a tier not here is unlimited


class ApiKey(pydantic.BaseModel):
    key_id: str
    tenant: str
    secret_sha256: str
    description: str = ""
    created_unix_ms: int
    revoked: bool = False
    revoked_unix_ms: int = 0
    internal: bool = False  # the controller's Batch API runner: may name the tenant per request


# -- names and keys ------------------------------------------------------------------------------
def check_tenant_name(name: str, allow_reserved: bool = False) -> str:
    """``name`` if it is a valid tenant name, else InvalidArgument saying why."""
    if not TENANT_NAME.fullmatch(name or ""):
        raise InvalidArgument(
            f"tenant name {name!r} is not valid: use 1-63 characters a-z, 0-9, '-' and '_', starting with a letter or digit")
    if name.startswith(RESERVED_PREFIX) and not allow_reserved:
        raise InvalidArgument(f"tenant name {name!r} is reserved: names starting with {RESERVED_PREFIX!r} belong to kvfleet")
    return name


def tier_name(tier: int) -> str:
    """The tier's name for a kvfleet.v1.Tier value (auto and unknown values: default)."""
    return TIER_NAMES.get(tier, "default")


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: ``(plaintext, key_id, sha256 of the secret)``."""
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, secret_sha256(secret)


def parse_key(text: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    m = _KEY.fullmatch(text)
    return (m.group(1), m.group(2)) if m else None


def key_matches(record: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, secret_sha256(secret))


# -- the controller's store ----------------------------------------------------------------------
class TenantStore:
    """Tenants, keys and quotas; the controller's only writer of ``P/tenants/`` and
    ``P/apikeys/``. Every method is a few etcd round trips; a lock orders this process's
    read-modify-writes (one controller writes at a time)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.kv = registry.client.kv
        self._lock = asyncio.Lock()

    def _tkey(self, name: str) -> bytes:
        return self.registry._key("tenants", name)

    def _kkey(self, key_id: str) -> bytes:
        return self.registry._key("apikeys", key_id)

    async def _list(self, kind: str, model):
        start = self.registry._key(kind)
        resp = await self.kv.get(start, prefix_range_end(start))
        return [model.model_validate_json(kv.value) for kv in resp.kvs]

    async def get_tenant(self, name: str) -> Tenant:
        resp = await self.kv.get(self._tkey(name))
        if not resp.kvs:
            raise NotFound(f"no tenant named {name!r}")
        return Tenant.model_validate_json(resp.kvs[0].value)

    async def create_tenant(self, name: str, description: str = "", *, allow_reserved: bool = False) -> Tenant:
        check_tenant_name(name, allow_reserved)
        tenant = Tenant(name=name, description=description, created_unix_ms=now_ms())
        key = self._tkey(name)
        # Create only if absent, in one round trip: two racing creates get one winner.
        resp = await self.kv.txn(
            [self.kv.txn_compare_create_revision(key, 0)],
            [self.kv.txn_op_put(key, tenant.model_dump_json().encode())],
        )
        if not resp.succeeded:
            raise AlreadyExists(f"tenant {name!r} already exists")
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        return sorted(await self._list("tenants", Tenant), key=lambda t: t.name)

    async def delete_tenant(self, name: str) -> int:
        """Revokes the tenant's keys, then deletes it; returns how many keys it revoked."""
        async with self._lock:
            await self.get_tenant(name)
            revoked = 0
            for k in await self._list("apikeys", ApiKey):
                if k.tenant == name and not k.revoked:
                    await self._revoke(k)
                    revoked += 1
            await self.kv.delete(self._tkey(name))
            return revoked

    async def set_quota(self, name: str, tier: str, requests_per_min: int | None = None,
                        tokens_per_min: int | None = None, concurrent: int | None = None) -> Tenant:
        """Changes the given limits of one tier (None: keep; 0: unlimited)."""
        if tier not in TIER_VALUES:
            raise InvalidArgument(f"unknown tier {tier!r}; choose from {', '.join(TIER_VALUES)}")
        async with self._lock:
            tenant = await self.get_tenant(name)
            q = tenant.quotas.get(tier, TierQuota())
            update = {k: v for k, v in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min),
                                        ("concurrent", concurrent)) if v is not None}
            for k, v in update.items():
                if v < 0:
                    raise InvalidArgument(f"{k} must not be negative, got {v}")
            q = q.model_copy(update=update)
            if q.unlimited:
                tenant.quotas.pop(tier, None)
            else:
                tenant.quotas[tier] = q
            await self.kv.put(self._tkey(name), tenant.model_dump_json().encode())
            return tenant

    async def create_key(self, tenant: str, description: str = "", *, internal: bool = False) -> tuple[str, ApiKey]:
        """Returns ``(plaintext key, record)``; the plaintext exists nowhere else."""
        async with self._lock:
            await self.get_tenant(tenant)
            plaintext, key_id, digest = new_key()
            record = ApiKey(key_id=key_id, tenant=tenant, secret_sha256=digest, description=description,
                            created_unix_ms=now_ms(), internal=internal)
            await self.kv.put(self._kkey(key_id), record.model_dump_json().encode())
            return plaintext, record

    async def get_key(self, key_id: str) -> ApiKey | None:
        resp = await self.kv.get(self._kkey(key_id))
        return ApiKey.model_validate_json(resp.kvs[0].value) if resp.kvs else None

    async def list_keys(self, tenant: str = "") -> list[ApiKey]:
        keys = await self._list("apikeys", ApiKey)
        return sorted((k for k in keys if not tenant or k.tenant == tenant), key=lambda k: (k.tenant, k.created_unix_ms))

    async def revoke_key(self, key_id: str) -> ApiKey:
        async with self._lock:
            record = await self.get_key(key_id)
            if record is None:
                raise NotFound(f"no API key with id {key_id!r}")
            if not record.revoked:
                await self._revoke(record)
            return record

    async def _revoke(self, record: ApiKey) -> None:
        record.revoked, record.revoked_unix_ms = True, now_ms()
        await self.kv.put(self._kkey(record.key_id), record.model_dump_json().encode())


async def ensure_service_key(registry: Registry, data_dir: Path) -> str:
    """The Batch API runner's own key (internal: it names each item's tenant in
    ``x-kvfleet-tenant``). Kept in ``data_dir/batch-runner.key`` (mode 0600) and reused
    across restarts; a new one is made if the file is missing or its etcd record is gone
    or revoked. Returns the plaintext."""
    store = TenantStore(registry)
    path = Path(data_dir) / SERVICE_KEY_FILE
    try:
        parsed = parse_key(path.read_text().strip())
    except FileNotFoundError:
        parsed = None
    if parsed is not None:
        record = await store.get_key(parsed[0])
        if record is not None and not record.revoked and record.internal and key_matches(record, parsed[1]):
            return path.read_text().strip()
    try:
        await store.create_tenant(SERVICE_TENANT, "the controller's Batch API runner", allow_reserved=True)
    except AlreadyExists:
        pass
    plaintext, _ = await store.create_key(SERVICE_TENANT, "Batch API runner", internal=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plaintext + "\n")
    os.replace(tmp, path)
    return plaintext


# -- the routers' view ---------------------------------------------------------------------------
T = TypeVar("T")


class _Resync(Exception):
    """The watch ended or skipped revisions (compaction): list again."""


class _Mirror(Generic[T]):
    """One etcd prefix in memory: ``items`` maps the key's last part to its parsed value."""

    def __init__(self, registry: Registry, kind: str, parse: Callable[[bytes], T]) -> None:
        self.client = registry.client
        self.start = registry._key(kind)
        self.parse = parse
        self.items: dict[str, T] = {}

    async def load(self) -> int:
        """Replaces ``items`` with the current contents; returns the revision read."""
        resp = await self.client.kv.get(self.start, prefix_range_end(self.start))
        items: dict[str, T] = {}
        for kv in resp.kvs:
            self._apply(items, kv.key, kv.value)
        self.items = items
        return resp.header.revision

    async def follow(self, revision: int) -> None:
        """Applies every change after ``revision``; raises _Resync when the watch ends."""
        async for resp in self.client.watch.watch(self.start, prefix_range_end(self.start), start_revision=revision + 1):
            if resp.compact_revision or resp.canceled:
                raise _Resync(f"watch of {self.start!r} compacted or cancelled")
            for ev in resp.events:
                self._apply(self.items, ev.kv.key, ev.kv.value if ev.type == 0 else None)  # 0 = PUT, 1 = DELETE
        raise _Resync(f"watch of {self.start!r} ended")

    def _apply(self, items: dict[str, T], key: bytes, value: bytes | None) -> None:
        ident = key[len(self.start):].decode()
        if value is None:
            items.pop(ident, None)
            return
        try:
            items[ident] = self.parse(value)
        except pydantic.ValidationError as exc:
            log.warning("ignoring malformed key %s: %s", key, exc)


class TenancyView:
    """What a router knows of tenants, keys and the live routers: etcd's state as of the
    watch latency (milliseconds on a healthy cluster). While etcd is unreachable it keeps
    the last state it saw (so a revocation made meanwhile applies once it reconnects).

    One per registry connection (``of``), shared by its users (the router's auth and quotas,
    the controller's Batch API): each ``start()`` is matched by one ``close()``, and the
    watch stops with the last."""

    _shared: "weakref.WeakKeyDictionary[Registry, TenancyView]" = weakref.WeakKeyDictionary()

    def __init__(self, registry: Registry) -> None:
        self.keys_m = _Mirror(registry, "apikeys", ApiKey.model_validate_json)
        self.tenants_m = _Mirror(registry, "tenants", Tenant.model_validate_json)
        self.routers_m = _Mirror(registry, "routers", RouterEntry.model_validate_json)
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._users = 0

    @classmethod
    def of(cls, registry: Registry) -> "TenancyView":
        view = cls._shared.get(registry)
        if view is None:
            view = cls._shared[registry] = cls(registry)
        return view

    @property
    def keys(self) -> dict[str, ApiKey]:
        return self.keys_m.items

    @property
    def tenants(self) -> dict[str, Tenant]:
        return self.tenants_m.items

    @property
    def routers(self) -> dict[str, RouterEntry]:
        return self.routers_m.items

    async def start(self, timeout: float = 30.0) -> None:
        """Starts following etcd (for the first user) and waits for the first snapshot."""
        self._users += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tenancy-view")
        await asyncio.wait_for(self.synced.wait(), timeout)

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.synced.clear()  # a later start() waits for a fresh snapshot

    async def _run(self) -> None:
        mirrors = (self.keys_m, self.tenants_m, self.routers_m)
        while True:
            try:
                revisions = [await m.load() for m in mirrors]
                self.synced.set()
                async with asyncio.TaskGroup() as tg:
                    for m, rev in zip(mirrors, revisions):
                        tg.create_task(m.follow(rev))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away, a compaction (an ExceptionGroup of those): list again
                log.warning("tenancy watch failed (%s); re-listing in 1 s", exc)
                await asyncio.sleep(1.0)
