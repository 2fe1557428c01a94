"""Who is calling: API keys per tenant, admin keys, per-tenant rate limits.

Keys come from environment variables named in the config, read once when the
router starts (``Authenticator.from_env``), never at import. With no tenants
configured, authentication is off and every caller is the anonymous tenant.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cmesh.config import MeshConfig
from cmesh.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from router.ratelimit import TenantLimiter

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    key_id: str = ""        # admin keys only: what the config history records (never the key)


class Authenticator:
    def __init__(self, keys: Mapping[str, str], admin_keys: set[str], enabled: bool) -> None:
        self._keys = dict(keys)            # api key -> tenant
        self._admin_keys = set(admin_keys)
        self.enabled = enabled

    @classmethod
    def from_env(cls, config: MeshConfig, environ: Mapping[str, str] | None = None) -> "Authenticator":
        env = os.environ if environ is None else environ
        keys: dict[str, str] = {}
        admin: set[str] = set()
        for tenant, spec in config.tenants.items():
            for key in _split(env.get(spec.api_keys_env, "")):
                keys[key] = tenant
                if spec.admin:
                    admin.add(key)
        if config.security.admin_keys_env:
            admin.update(_split(env.get(config.security.admin_keys_env, "")))
        return cls(keys, admin, enabled=bool(config.tenants) or bool(admin))

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(ANONYMOUS)
        if not authorization:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <api key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization must be 'Bearer <api key>'")
        key = key.strip()
        tenant = next((t for k, t in self._keys.items() if hmac.compare_digest(k, key)), None)
        is_admin = any(hmac.compare_digest(k, key) for k in self._admin_keys)
        if tenant is None and not is_admin:
            raise Unauthenticated("unknown API key")
        if not is_admin:
            return Principal(tenant)
        return Principal(tenant or "admin", admin=True, key_id=key_id(key))

    def require_admin(self, principal: Principal) -> None:
        if self.enabled and not principal.admin:
            raise PermissionDenied(f"tenant {principal.tenant!r} may not use admin operations")


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


class Gate:
    """Authorization for one call: tenant may use the model, within its rate."""

    def __init__(self, config: MeshConfig, limiter: TenantLimiter) -> None:
        self.config = config
        self.limiter = limiter

    def apply(self, config: MeshConfig, now: float) -> None:
        self.config = config
        self.limiter.reconfigure(config.tenants, now)

    def check_model(self, principal: Principal, model: str) -> None:
        allowed = self.config.models[model].tenants if model in self.config.models else None
        if allowed is not None and principal.tenant not in allowed and not principal.admin:
            raise PermissionDenied(f"tenant {principal.tenant!r} may not call {model!r}", component=model)

    def admit(self, principal: Principal, model: str, now: float, claimed_tenant: str = "") -> None:
        if claimed_tenant and claimed_tenant != principal.tenant and not principal.admin:
            raise PermissionDenied(f"API key of tenant {principal.tenant!r} cannot act for {claimed_tenant!r}")
        self.check_model(principal, model)
        if principal.tenant in self.config.tenants and not self.limiter.try_take(principal.tenant, now):
            err = ResourceExhausted(f"tenant {principal.tenant!r} is over its rate limit",
                                    retry_after_ms=self.limiter.retry_after_ms(principal.tenant, now))
            err.reason = "rate_limited"          # not a full queue: slowing down is the remedy
            raise err
