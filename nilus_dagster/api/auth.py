"""Bearer tokens: only SHA-256 hashes are kept, each bound to tenants and one scope.

Scopes: `read` (a tenant's monitoring), `operate` (read, and operator actions: pipeline state...),
`runtime` (the internal runtime API), `admin` (everything, every tenant). Roles name the same
grants: `viewer` = read, `editor` = operate, `admin` = admin; a token gives `scope` or `role`.
Sources: `NILUS_API_TOKENS_FILE` (YAML/JSON list of `{name, sha256, tenants, scope | role}`) and,
for development, `NILUS_API_TOKENS` (`token:tenant1,tenant2:scope-or-role;...`, hashed at load).

    python -m nilus_dagster.api.auth hash <token>     # the sha256 to put in the tokens file
    python -m nilus_dagster.api.auth new              # a fresh random token and its hash
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

Scope = Literal["read", "operate", "runtime", "admin"]
SCOPES: tuple[str, ...] = ("read", "operate", "runtime", "admin")
ROLES = {"viewer": "read", "editor": "operate", "admin": "admin"}  # role -> scope
ROLE_OF = {scope: role for role, scope in ROLES.items()}
# What a token of each scope may do besides its own scope (admin may do everything).
IMPLIED = {"operate": ("read",)}


class TokenConfigError(ValueError):
    """The token file or variable is malformed."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to and what it may do."""

    name: str
    tenants: frozenset[str]
    scope: str

    @property
    def role(self) -> str | None:
        """viewer / editor / admin (None for a runtime token)."""
        return ROLE_OF.get(self.scope)

    def has_scope(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope or scope in IMPLIED.get(self.scope, ())

    def may(self, scope: str, tenant: str | None = None) -> bool:
        if self.scope == "admin":
            return True
        return self.has_scope(scope) and (tenant is None or tenant in self.tenants)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenRegistry:
    """Looks a presented token up by hash; every comparison runs in constant time."""

    def __init__(self, entries: Iterable[tuple[str, Principal]]):
        self._entries = [_Entry(bytes.fromhex(digest), p) for digest, p in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._entries:  # no early exit: timing does not depend on which entry matched
            if hmac.compare_digest(presented, entry.digest):
                found = entry.principal
        return found

    @classmethod
    def load(cls, tokens_file: Path | None = None, tokens_env: str | None = None) -> TokenRegistry:
        entries: list[tuple[str, Principal]] = []
        if tokens_file is not None:
            entries += _from_file(tokens_file)
        if tokens_env:
            entries += _from_env(tokens_env)
        return cls(entries)


def _principal(name: str, tenants: object, scope: object, where: str) -> Principal:
    scope = ROLES.get(scope, scope) if isinstance(scope, str) else scope
    if scope not in SCOPES:
        choices = ", ".join((*SCOPES, *ROLES))
        raise TokenConfigError(f"{where}: scope (or role) must be one of {choices}, got {scope!r}")
    if isinstance(tenants, str):
        tenants = [t for t in tenants.split(",") if t]
    if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
        raise TokenConfigError(f"{where}: tenants must be a list of tenant names")
    if scope != "admin" and not tenants:
        raise TokenConfigError(f"{where}: a {scope} token needs at least one tenant")
    return Principal(name=name, tenants=frozenset(tenants), scope=str(scope))


def _from_file(path: Path) -> list[tuple[str, Principal]]:
    try:
        data = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise TokenConfigError(f"cannot read tokens file {path}: {exc}") from None
    if isinstance(data, dict) and "tokens" in data:
        data = data["tokens"]
    if not isinstance(data, list):
        raise TokenConfigError(f"{path}: expected a list of {{name, sha256, tenants, scope}}")
    entries = []
    for index, item in enumerate(data):
        where = f"{path}[{index}]"
        if not isinstance(item, dict):
            raise TokenConfigError(f"{where}: expected a mapping")
        digest = str(item.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokenConfigError(f"{where}: sha256 must be 64 hex digits (python -m nilus_dagster.api.auth hash)")
        name = str(item.get("name") or f"token{index}")
        if item.get("scope") and item.get("role"):
            raise TokenConfigError(f"{where}: give scope or role, not both")
        grant = item.get("scope") or item.get("role")
        entries.append((digest, _principal(name, item.get("tenants") or [], grant, where)))
    return entries


def _from_env(value: str) -> list[tuple[str, Principal]]:
    entries = []
    for index, part in enumerate(p for p in value.split(";") if p.strip()):
        fields = part.strip().split(":")
        if len(fields) != 3 or not fields[0]:
            raise TokenConfigError(f"NILUS_API_TOKENS entry {index}: expected token:tenant1,tenant2:scope")
        token, tenants, scope = fields
        where = f"NILUS_API_TOKENS entry {index}"
        entries.append((hash_token(token), _principal(f"env{index}", tenants, scope, where)))
    return entries


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "hash":
        print(hash_token(args[1]))
        return 0
    if args == ["new"]:
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {hash_token(token)}")
        return 0
    print("usage: python -m nilus_dagster.api.auth hash <token> | new", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
