"""FastAPI dependencies: the services, the caller (bearer token) and tenant/scope checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nilus_dagster.api.auth import Principal
from nilus_dagster.api.errors import forbidden, unauthorized
from nilus_dagster.api.params import NAME_PATTERN
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.services import Services

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")


def services(request: Request) -> Services:
    return request.app.state.services


def read_model(request: Request) -> ReadModel:
    return request.app.state.services.read_model


def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """Any valid token; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise unauthorized()
    principal = services(request).tokens.authenticate(credentials.credentials)
    if principal is None:
        raise unauthorized()
    request.state.principal = principal
    return principal


TenantName = Annotated[str, Path(pattern=NAME_PATTERN, description="Tenant name")]


def tenant_scope(scope: str) -> Callable[..., str]:
    """A dependency returning the path's tenant once the token may use `scope` on it."""

    def check(tenant: TenantName, principal: Annotated[Principal, Depends(authenticate)]) -> str:
        ensure(principal, scope, tenant)
        return tenant

    return check


def ensure(principal: Principal, scope: str, tenant: str) -> None:
    if principal.may(scope, tenant):
        return
    if not principal.has_scope(scope):
        raise forbidden(f"this token has scope '{principal.scope}'; this endpoint needs '{scope}'")
    raise forbidden("this token may not access this tenant")


ReadTenant = Annotated[str, Depends(tenant_scope("read"))]
RuntimeTenant = Annotated[str, Depends(tenant_scope("runtime"))]
OperateTenant = Annotated[str, Depends(tenant_scope("operate"))]
AdminTenant = Annotated[str, Depends(tenant_scope("admin"))]
Model = Annotated[ReadModel, Depends(read_model)]
