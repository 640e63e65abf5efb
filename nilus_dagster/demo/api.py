"""The demo's monitoring API: `nilus-api` next to `dagster dev`, with a read token per tenant.

Tokens are new on every start: only their SHA-256 hashes are written (`<home>/api-tokens.yaml`),
the tokens themselves are printed once, with everything needed to run `nilus-api` by hand.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import yaml

from nilus_dagster.api.auth import hash_token
from nilus_dagster.api.settings import API_PREFIX
from nilus_dagster.spec.loading import load_declared_pipelines

TOKENS_FILE = "api-tokens.yaml"


def demo_tokens(home: Path, defs_dir: Path) -> dict[str, str]:
    """A fresh read token for each tenant declared under `defs_dir`; hashes go to the tokens file."""
    tenants = sorted({declared.pipeline.tenant for declared in load_declared_pipelines(defs_dir)})
    tokens = {tenant: f"demo-{tenant}-{secrets.token_urlsafe(16)}" for tenant in tenants}
    entries = [
        {"name": f"demo-{tenant}", "sha256": hash_token(token), "tenants": [tenant], "scope": "read"}
        for tenant, token in tokens.items()
    ]
    path = home / TOKENS_FILE
    path.write_text(f"# Written by nilus-demo at each start (hashes only).\n{yaml.safe_dump({'tokens': entries})}")
    return tokens


def api_environment(env: dict[str, str], home: Path, ui_port: int, api_port: int, metrics_port: int) -> dict[str, str]:
    """`env` (DAGSTER_HOME, NILUS_STATE_DSN set) plus what `nilus-api` reads."""
    return {
        **env,
        "NILUS_DEFS_DIR": str(Path("pipelines").resolve()),
        "NILUS_API_TOKENS_FILE": str(home / TOKENS_FILE),
        "NILUS_API_HOST": "127.0.0.1",
        "NILUS_API_PORT": str(api_port),
        "NILUS_METRICS_HOST": "127.0.0.1",
        "NILUS_METRICS_PORT": str(metrics_port),
        "NILUS_DAGSTER_UI_URL": f"http://127.0.0.1:{ui_port}",
    }


def start_api(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`nilus-api` in its own process group (stopped like `dagster dev`)."""
    return subprocess.Popen(["nilus-api"], env=env, start_new_session=True)


def summary(env: dict[str, str], tokens: dict[str, str]) -> str:
    """What the demo prints: where everything is, the tokens, and the equivalent commands."""
    api = f"http://127.0.0.1:{env['NILUS_API_PORT']}"
    lines = [
        f"nilus-demo: SHOP_DSN={env['SHOP_DSN']}",
        f"nilus-demo: NILUS_STATE_DSN={env['NILUS_STATE_DSN']}",
        f"nilus-demo: DAGSTER_HOME={env['DAGSTER_HOME']}",
        f"nilus-demo: monitoring API at {api}{API_PREFIX}",
        f"nilus-demo: Swagger UI at {api}/nilus-manager/docs (Authorize with a token below)",
        f"nilus-demo: metrics at http://127.0.0.1:{env['NILUS_METRICS_PORT']}/metrics",
    ]
    lines += [f"nilus-demo: API token for tenant {tenant}: {token}" for tenant, token in tokens.items()]
    if tokens:
        tenant, token = next(iter(tokens.items()))
        lines.append(
            f"nilus-demo: try: curl -H 'Authorization: Bearer {token}' {api}{API_PREFIX}/tenants/{tenant}/pipelines"
        )
    lines.append(
        f"nilus-demo: the same API by hand: DAGSTER_HOME={env['DAGSTER_HOME']} "
        f"NILUS_STATE_DSN={env['NILUS_STATE_DSN']} "
        f"NILUS_DEFS_DIR=pipelines NILUS_API_TOKENS_FILE={env['NILUS_API_TOKENS_FILE']} .venv/bin/nilus-api"
    )
    return "\n".join(lines)
