"""Tenants: who a client is, what it may see, and its share (issue 17).

A tenants file (``--tenants FILE``, or ``SQUIRE_TENANTS``) is TOML::

    [tenants.alpha]
    token_sha256 = ["<hex SHA-256 of a client token>"]  # no plain tokens in the file
    weight = 1                 # its share of the workers' slots, against the others'
    max_directives = 20        # directives it runs at once
    max_queued_tasks = 200000  # its tasks queued at once (publishing waits past it)

    [tenants.ops]
    token_sha256 = ["..."]
    admin = true               # an operator: sees and may cancel every tenant's work

A client token is the identity: the tenant whose ``token_sha256`` lists its
digest (``printf %s "$TOKEN" | sha256sum``). A tenant sees, attaches to and
cancels only its own directives and channels; another tenant's id is
NOT_FOUND, as an unknown one (no probing). Loading is pure: no I/O but
reading the file, and every mistake is a :class:`TenantsError` naming the
file, the tenant and the key.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator_service._model import PlanSpec, TenantShare

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
KEYS = frozenset({
    "token_sha256", "cert_subjects", "weight", "max_directives", "max_queued_tasks", "admin",
})
MAX_WEIGHT = 1_000


class TenantsError(ValueError):
    """The tenants file cannot be used; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    digests: tuple[bytes, ...] = field(repr=False)
    # mTLS: client certificate subjects ("CN=team-a,O=Example", as gRPC
    # reports them) that name this tenant when a call carries no token.
    subjects: tuple[str, ...] = ()
    weight: int = 1
    max_directives: int | None = None  # None: only the orchestrator's own limits
    max_queued_tasks: int | None = None
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Tenants:
    """Every tenant of the file, by name, and who a token digest is."""

    by_name: Mapping[str, Tenant]
    source: str = ""  # the file it came from, for messages

    def by_digest(self) -> dict[bytes, Tenant]:
        return {d: t for t in self.by_name.values() for d in t.digests}

    def by_subject(self) -> dict[str, Tenant]:
        return {s: t for t in self.by_name.values() for s in t.subjects}



def shares_of(tenants: Tenants) -> dict[str, TenantShare]:
    """What the routing core enforces of each tenant."""
    return {
        name: TenantShare(t.weight, t.max_directives, t.max_queued_tasks)
        for name, t in tenants.by_name.items()
    }


def load_tenants(path: str | Path) -> Tenants:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TenantsError(f"tenants file {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_tenants(text, str(path))


def parse_tenants(text: str, source: str = "<tenants>") -> Tenants:
    def bad(why: str) -> TenantsError:
        return TenantsError(f"tenants file {source!r}: {why}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise bad(f"not valid TOML: {exc}") from None
    extra = set(data) - {"tenants"}
    if extra:
        raise bad(f"unknown top-level key(s) {sorted(extra)}; tenants go in [tenants.NAME] tables")
    table = data.get("tenants")
    if not isinstance(table, dict) or not table:
        raise bad("no tenants: add at least one [tenants.NAME] table")
    tenants: dict[str, Tenant] = {}
    owners: dict[bytes, str] = {}
    subject_owners: dict[str, str] = {}
    for name, entry in table.items():
        if not NAME.fullmatch(name):
            raise bad(f"tenant name {name!r}: use letters, digits, '_', '.', '-' (at most 63)")
        if not isinstance(entry, dict):
            raise bad(f"tenants.{name} must be a table")
        tenant = _tenant(name, entry, bad)
        for d in tenant.digests:
            if d in owners:
                raise bad(f"tenants.{name}: a token_sha256 of tenants.{owners[d]} too; "
                          "a token names one tenant")
            owners[d] = name
        for subject in tenant.subjects:
            if subject in subject_owners:
                raise bad(f"tenants.{name}: cert_subjects {subject!r} names "
                          f"tenants.{subject_owners[subject]} too")
            subject_owners[subject] = name
        tenants[name] = tenant
    return Tenants(tenants, source)


def _tenant(name: str, entry: dict[str, Any], bad: Any) -> Tenant:
    unknown = set(entry) - KEYS
    if unknown:
        raise bad(f"tenants.{name}: unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    hashes = entry.get("token_sha256", [])
    subjects = entry.get("cert_subjects", [])
    if not isinstance(subjects, list) or not all(isinstance(x, str) and x for x in subjects):
        raise bad(f"tenants.{name}.cert_subjects: a list of client certificate subjects "
                  "such as \"CN=team-a\"")
    if not isinstance(hashes, list) or not (hashes or subjects):
        raise bad(f"tenants.{name}.token_sha256: a list of at least one hex SHA-256 digest "
                  "of a client token (printf %s \"$TOKEN\" | sha256sum), or cert_subjects")
    digests = []
    for value in hashes:
        if not isinstance(value, str) or not HEX_SHA256.fullmatch(value.strip().lower()):
            raise bad(f"tenants.{name}.token_sha256: {value!r} is not 64 hex digits "
                      "(the SHA-256 of the token, not the token)")
        digests.append(bytes.fromhex(value.strip()))

    def number(key: str, low: int, high: int | None = None) -> int | None:
        value = entry.get(key)
        if value is None:
            return None
        if type(value) is not int or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise bad(f"tenants.{name}.{key}: an integer {span}, not {value!r}")
        return value

    admin = entry.get("admin", False)
    if type(admin) is not bool:
        raise bad(f"tenants.{name}.admin: true or false, not {admin!r}")
    return Tenant(
        name, tuple(dict.fromkeys(digests)), tuple(dict.fromkeys(subjects)),
        number("weight", 1, MAX_WEIGHT) or 1,
        number("max_directives", 1), number("max_queued_tasks", 1), admin,
    )


# ------------------------------------------------------------------ callers


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes the call now: its tenant ("" without a tenants file) and
    whether it is an operator (sees every tenant's work)."""

    tenant: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.tenant


# Without a tenants file every caller is this one: it sees everything.
ANYONE = Caller("", admin=True)

CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "squire_caller", default=None
)


def caller() -> Caller:
    """The caller of the handler running now (set by the security interceptor)."""
    return CALLER.get() or ANYONE


def owned(plan: PlanSpec) -> PlanSpec:
    """``plan`` as the caller's: its tenant is whoever submits it."""
    tenant = caller().tenant
    return plan if plan.tenant == tenant else dataclasses.replace(plan, tenant=tenant)
