"""Starting or joining Ray with the project's safety defaults, and finding its metrics endpoint.

- Token authentication stays on. Ray (2.59+) turns it on by itself for a new local instance when
  ``RAY_AUTH_MODE`` is unset (generating ``~/.ray/auth_token``), and when joining a cluster whose
  token is present; ``RAY_AUTH_MODE`` set to anything but ``token`` is refused. (Ray reads the
  variable when it is imported, so setting it from here would be too late: ``launch.sh`` exports it
  before starting Ray processes.)
- The dashboard binds to 127.0.0.1 unless ``dashboard_host`` says otherwise.
"""

from __future__ import annotations

import os

import ray


def secure_env() -> None:
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        raise RuntimeError(f"RAY_AUTH_MODE={mode!r} turns Ray's token authentication off; this project keeps "
                           f"it on (anyone who can reach an unauthenticated Ray port can run code). Unset it "
                           f"or set RAY_AUTH_MODE=token")


def token_source() -> str | None:
    """Where Ray would read this process's auth token from (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token, in Ray's order), or None when there is none."""
    from pathlib import Path
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).is_file() and Path(path).stat().st_size else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.stat().st_size else None


def check_join(address: str | None) -> list[str]:
    """Joining a cluster (``address`` set) needs token authentication configured: without a token Ray
    joins an unauthenticated cluster without a word, and anyone who reaches its ports can run code."""
    if not address or address == "local" or token_source() is not None:
        return []
    bad = os.environ.get("RAY_AUTH_TOKEN_PATH")
    where = (f"RAY_AUTH_TOKEN_PATH={bad} names no readable, non-empty file" if bad else
             "neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set and ~/.ray/auth_token does not exist")
    return [f"joining the Ray cluster at {address!r} without token authentication is refused: {where}. Copy the "
            f"cluster's token (on its head node: `ray get-auth-token`) into RAY_AUTH_TOKEN or a file named by "
            f"RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token on every node (see README, 'Running on a cluster')"]


def init(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
         dashboard_host: str = "127.0.0.1", namespace: str = "cora") -> dict:
    """Join ``address`` (a running cluster, or 'auto'), or start a new local instance (``address``
    None: never a cluster found through RAY_ADDRESS or a ``ray start`` left on this machine)."""
    secure_env()
    if ray.is_initialized():
        return dict(_INFO)                  # what the first init of this process found (empty if not ours)
    problems = check_join(address)
    if problems:
        raise RuntimeError(problems[0])
    if address:
        ctx = ray.init(address=address, namespace=namespace, log_to_driver=True)
    else:
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=dashboard_host,
                       namespace=namespace)
    url = getattr(ctx, "dashboard_url", None)
    _INFO.update(dashboard_url=f"http://{url}" if url and "://" not in url else url,
                 address=ctx.address_info.get("address"))
    return dict(_INFO)


_INFO: dict = {}


def metrics_urls() -> list[str]:
    """The Prometheus endpoints of all alive nodes (Ray's per-node metrics agents)."""
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive")]
