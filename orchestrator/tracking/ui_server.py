"""`lottery ui`'s web server: MLflow's own app, plus one page that keeps it in the training view.

MLflow 3.17 draws either its GenAI or its model-training navigation. It takes the choice from the
URL's `workflowType` parameter, else from the browser's localStorage key `mlflow.workflowType_v1`,
whose default is GenAI (server/js: WorkflowTypeProvider). Its own links (a run in the runs table,
the run page's breadcrumb) drop the parameter, so a researcher who opened the experiment with it
lands in GenAI pages after one click. The experiment tag `mlflow.experimentKind` no longer decides.

So the URL `lottery ui` prints is `/lottery/open` on MLflow's own origin (localStorage is per
origin): a page that stores the training view, and one colour per arm under MLflow's
`experimentRunColors` key (group colours are otherwise a hash of the group name, and two arms often
share one), then replaces itself with the experiment's runs page. Every other path is MLflow's app,
untouched. MLflow is configured through the environment variables its own `mlflow ui` sets for the
app (mlflow.server.constants), and served by uvicorn in this process (one worker).
"""

from __future__ import annotations

import html
import json
import os
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

OPEN_PATH = "/lottery/open"
WORKFLOW_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage: `${key}_v${version}`, JSON value
TRAINING = "machine_learning"
COLORS_KEY = "experimentRunColors"  # group id -> colour; a runs table group's id is `tag.<tag>.<value>`
# Distinct on white, in order (Tableau 10, then the darker halves of Tableau 20).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
)  # fmt: skip

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def arm_colors(arms: list[str], tag: str = "arm") -> dict[str, str]:
    """One palette colour per arm group, in the order given (cycling past 16 arms)."""
    return {f"tag.{tag}.{arm}": PALETTE[i % len(PALETTE)] for i, arm in enumerate(arms)}


def open_page(routes: dict[str, str], colors: dict[str, str]) -> bytes:
    """The page behind the printed URLs: settings into localStorage, then MLflow's page: `routes[""]`
    (the runs), or `routes[RUN]` for `?run=RUN` (the parent run). Routes are hash routes of MLflow's app."""
    script = (
        f"localStorage.setItem({json.dumps(WORKFLOW_KEY)}, {json.dumps(json.dumps(TRAINING))});"
        f"var c = {{}}; try {{ c = JSON.parse(localStorage.getItem({json.dumps(COLORS_KEY)})) || {{}}; }}"
        " catch (e) {}"
        f"Object.assign(c, {json.dumps(colors)});"
        f"localStorage.setItem({json.dumps(COLORS_KEY)}, JSON.stringify(c));"
        f"var routes = {json.dumps(routes)};"
        "var run = new URLSearchParams(location.search).get('run') || '';"
        "location.replace('/' + (routes[run] || routes['']));"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>lottery ui</title></head><body>"
        f"<p>Opening <a href='/{html.escape(routes[''])}'>the runs</a> in MLflow's training view...</p>"
        f"<script>{script}</script></body></html>"
    ).encode()


def with_open_page(app: ASGIApp, routes: dict[str, str], colors: dict[str, str]) -> ASGIApp:
    """MLflow's ASGI app with OPEN_PATH answered before it."""
    page = open_page(routes, colors)

    async def serve(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == OPEN_PATH:
            headers = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": page})
            return
        await app(scope, receive, send)

    return serve


def mlflow_environment(tracking_uri: str, artifacts: Path) -> dict[str, str]:
    """What `mlflow ui --backend-store-uri URI` hands its app: the store, the registry on the same
    store, artifacts served by the server (new ones under `artifacts`; a sweep's runs name their own)."""
    from mlflow.server import constants

    return {
        constants.BACKEND_STORE_URI_ENV_VAR: tracking_uri,
        constants.REGISTRY_STORE_URI_ENV_VAR: tracking_uri,
        constants.SERVE_ARTIFACTS_ENV_VAR: "true",
        constants.ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/",
        constants.ARTIFACTS_DESTINATION_ENV_VAR: str(artifacts),
        "_MLFLOW_SGI_NAME": "uvicorn",
    }


def serve(
    tracking_uri: str, artifacts: Path, port: int, routes: dict[str, str], colors: dict[str, str]
) -> None:
    """MLflow's app with the open page on 127.0.0.1:port, until interrupted."""
    os.environ.update(mlflow_environment(tracking_uri, artifacts))
    warnings.filterwarnings("ignore", module="mlflow.server.fastapi_app")  # MLflow's own WSGI deprecation
    import uvicorn
    from mlflow.server.fastapi_app import app as mlflow_app  # reads the environment above

    uvicorn.run(with_open_page(mlflow_app, routes, colors), host="127.0.0.1", port=port, log_level="warning")
