"""What jobs/promote.py asks of a running Serve instance: the deployed config of its applications,
a changed config applied the way `serve deploy` applies one, waiting until an application runs on
it, and the per-version request counts of the serving metrics.

Why the controller's client and not the dashboard's REST API (`PUT /api/serve/applications/`,
what `serve deploy` calls): the REST API needs the dashboard's address, which a job that joined
the cluster through a GCS address in $RAY_ADDRESS does not have, and a cluster may run without a
dashboard. The client makes the calls the REST handler makes (`get_serve_details`, `deploy_apps`:
a declarative config of every application; the applications it leaves out that were deployed from
a config are deleted, ones deployed from Python are kept). Ray is pinned (2.60);
tests/test_promote.py runs every call here against a real cluster.

What Serve does with a changed config (ray/serve/_private/application_state.py): new `args`
rebuild the application and restart every deployment in it (a rolling update: new replicas start
before old ones stop, `max_surge_percent`); a changed `user_config` of a deployment only calls the
running replicas' `reconfigure` (the ingress's canary routing uses that); another application is
left alone.
"""
from __future__ import annotations

import copy
import time
import urllib.request
from typing import Callable, Optional

from ark_ray.config import UserError

INGRESS, MODEL = "ArkIngress", "ArkTranscriber"


class ServeControlError(UserError):
    """No Serve instance, no such application, or one that cannot be updated from its config."""


class NotRunning(RuntimeError):
    """An application did not come up on its new config (DEPLOY_FAILED, UNHEALTHY, or too slow)."""


def _client():
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client()
    except Exception as e:  # noqa: BLE001 - RayServeException / ConnectionError: no Serve here
        raise ServeControlError(f"no Serve instance on this Ray cluster ({type(e).__name__}: {e}); start "
                                "the endpoint first (`serve deploy serve_configs/gpu.yaml`)") from None


def details():
    """The live ServeInstanceDetails (applications, their deployed configs, statuses, replicas)."""
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_client().get_serve_details())


def app_configs() -> dict[str, dict]:
    """{application name: its deployed config as a dict}, for every application deployed from a config."""
    out = {}
    for name, app in details().applications.items():
        if app.deployed_app_config is not None:
            out[name] = app.deployed_app_config.model_dump(exclude_unset=True)
    return out


def app_config(name: str) -> dict:
    """One application's deployed config; a clear error if it is missing or was deployed from Python."""
    apps = details().applications
    if name not in apps:
        raise ServeControlError(f"app: no Serve application {name!r} is running (running: {sorted(apps) or 'none'})")
    cfg = apps[name].deployed_app_config
    if cfg is None:
        raise ServeControlError(f"app: Serve application {name!r} was deployed from Python (serve.run), not from a "
                                "config: deploy it with `serve deploy CONFIG.yaml` (or `serve run CONFIG.yaml`) "
                                "so that it can be updated in place")
    return cfg.model_dump(exclude_unset=True)


def status(name: str) -> tuple[str, str, float]:
    """(application status, its message, when it was last deployed); NOT_STARTED if it does not exist."""
    app = details().applications.get(name)
    if app is None:
        return "NOT_STARTED", "", 0.0
    return str(app.status.value if hasattr(app.status, "value") else app.status), app.message, app.last_deployed_time_s


def apply(changed: dict[str, Optional[dict]]) -> dict[str, float]:
    """Deploy every config-deployed application with `changed` applied ({name: new config, or None
    to delete it}); returns each changed application's last-deployed time before the change."""
    from ray.serve.schema import ServeDeploySchema

    d = details()
    before = {n: (d.applications[n].last_deployed_time_s if n in d.applications else 0.0) for n in changed}
    apps = app_configs()
    for name, cfg in changed.items():
        if cfg is None:
            apps.pop(name, None)
        else:
            apps[name] = cfg
    schema = {"applications": list(apps.values())}
    for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
        value = getattr(d, key, None)
        if value is not None:
            schema[key] = value.model_dump(exclude_unset=True) if hasattr(value, "model_dump") else value
    _client().deploy_apps(ServeDeploySchema.model_validate(schema))
    return before


def wait_running(name: str, since: float, timeout_s: float,
                 on_change: Optional[Callable[[str, str], None]] = None) -> None:
    """Until application `name`, deployed again after `since`, is RUNNING (every deployment on the new
    config, healthy); NotRunning on DEPLOY_FAILED / UNHEALTHY or after `timeout_s`.
    `on_change(status, message)` hears each status it passes through."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        state, message, deployed = status(name)
        if deployed > since or since == 0.0:
            if (state, message) != last and on_change is not None:
                on_change(state, message)
            last = (state, message)
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise NotRunning(f"application {name!r} is {state}: {message}")
        if time.monotonic() > deadline:
            raise NotRunning(f"application {name!r} not RUNNING after {timeout_s:.0f} s (status {state}: {message})")
        time.sleep(0.5)


def wait_deleted(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while status(name)[0] != "NOT_STARTED":
        if time.monotonic() > deadline:
            raise NotRunning(f"application {name!r} still present after {timeout_s:.0f} s")
        time.sleep(0.5)


def deployment_entry(cfg: dict, deployment: str) -> dict:
    """The `deployments:` entry of `deployment` in an application config (added if absent); `cfg` is changed."""
    entries = cfg.setdefault("deployments", [])
    for e in entries:
        if e.get("name") == deployment:
            return e
    entries.append({"name": deployment})
    return entries[-1]


def with_args(cfg: dict, **args) -> dict:
    """A copy of an application config with some `args` replaced."""
    out = copy.deepcopy(cfg)
    out["args"] = dict(out.get("args") or {}, **args)
    return out


def ingress_info(app: str, timeout_s: float = 60.0) -> dict:
    """What the running ingress routes to ({model, version, canary?}), from one of its replicas."""
    from ray import serve

    return serve.get_app_handle(app).info.remote().result(timeout_s=timeout_s)


# ------------------------------------------------------------------ per-version counts (the canary check)
def model_request_counts() -> dict[tuple[str, str], float]:
    """{(version, status): transcriptions} summed over every live node's metrics endpoint: the
    `ark_serve_model_requests_total` series the serving dashboard plots (exported every few seconds)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            body = urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:
            continue      # a node going away; its counts come back with its replacement's
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == "ray_ark_serve_model_requests_total":
                    key = (s.labels.get("version", ""), s.labels.get("status", ""))
                    out[key] = out.get(key, 0.0) + s.value
    return out
