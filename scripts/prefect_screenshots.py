"""What an operator sees in the Prefect UI, rendered to PNGs by a headless Chromium.

Starts a Prefect server with its UI on a free loopback port (a throw-away home), runs the demo
flow against it (ISBI 2012: train for ``--minutes``, score slices 20-24, predict all 25), then
renders the pages a person opens after a run: the demo's flow run, the predict run (its logs),
the prediction preview, the model card, the progress artifact, and the forms that start a
served deployment; then fills the predict form's three required fields, submits it and renders
the run that ``serve`` makes of it (printing its parameters: what the form sent).

Needs the Debian package ``chromium`` (``apt-get install chromium``) and Playwright to drive it
(``pip install playwright``; it uses that Chromium, no browser download): a page of the UI
draws itself after its data arrives, which a plain ``chromium --screenshot`` does not wait for.
Not part of the test suite.

    .venv/bin/python scripts/prefect_screenshots.py [--out runs/screenshots] [--minutes 0.5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
WINDOW = "1440,1800"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, port: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A Prefect server with the UI, as the README starts it; the environment that reaches it."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # The UI asks 127.0.0.1:4200 for its data unless told where the API is.
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    command = [sys.executable, "-m", "prefect", "server", "start"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(home / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(180):
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return server, {**env, "PREFECT_API_URL": api}
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(f"the Prefect server stopped: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    server.terminate()
    sys.exit("the Prefect server did not become healthy in 180 s")


def newest(api: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
    found = httpx.post(f"{api}/{what}/filter", json={**body, "limit": 1}, timeout=30).json()
    if not found:
        sys.exit(f"no {what} matches {body}")
    return dict(found[0])


def start_serve(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    """``serve`` as the README starts it, with the demo's model (ingest scheduled yearly)."""
    model = home / "demo" / "model.pt"
    folders = [home / "landing", home / "predictions"]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    serve = [sys.executable, "-m", "unet_volume_flows.serve", "--model", str(model)]
    return subprocess.Popen(
        [*serve, "--landing", str(folders[0]), "--outputs", str(folders[1]), "--cron", "0 0 1 1 *"],
        env=env,
        cwd=ROOT,
        stdout=(home / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def served_forms(api: str, ui: str) -> dict[str, str]:
    """The custom-run forms of the served deployments: where an operator types a run's
    parameters, so their descriptions and the optional fields' types show there."""
    forms = {}
    for flow in ("predict", "train"):
        for _ in range(120):
            found = httpx.get(f"{api}/deployments/name/{flow}/served", timeout=10)
            if found.status_code == 200:
                break
            time.sleep(1)
        else:
            sys.exit(f"serve registered no {flow}/served in 120 s (see serve.log)")
        forms[f"{flow}-form"] = f"{ui}/deployments/deployment/{found.json()['id']}/run"
    return forms


@contextmanager
def browser_page() -> Iterator[Any]:
    """A page of the Debian Chromium, driven by Playwright, at the screenshots' size."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    width, height = (int(v) for v in WINDOW.split(","))
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": width, "height": height})
        browser.close()


def render(page: Any, urls: dict[str, str], out: Path) -> None:
    """Each page as the UI draws it, once the network is quiet and the page has settled."""
    for name, url in urls.items():
        page.goto(url, wait_until="networkidle", timeout=120_000)
        page.wait_for_timeout(3000)  # charts and markdown render after the data
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        print(f"{out / name}.png: {url}")


def run_from_form(page: Any, api: str, form: str, values: list[str], out: Path) -> dict[str, Any]:
    """Fill a run form's text fields with ``values``, leave the rest as they are and submit, as
    an operator does; wait for ``serve`` to run it. The flow run, as the API has it."""
    page.goto(form, wait_until="networkidle", timeout=120_000)
    for index, value in enumerate(values):
        page.locator("textarea").nth(index).fill(value)
    page.get_by_role("button", name="Submit").click()
    try:  # a submitted form goes to the deployment's runs
        page.wait_for_url(lambda url: not url.rstrip("/").endswith("/run"), timeout=60_000)
    except Exception:
        page.screenshot(path=str(out / "form-refused.png"), full_page=True)
        raise
    deployment = form.rstrip("/").rsplit("/", 2)[-2]
    body = {"sort": "EXPECTED_START_TIME_DESC", "deployments": {"id": {"any_": [deployment]}}}
    run_id = newest(api, "flow_runs", body)["id"]
    for _ in range(300):
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1)
    ui = form.split("/deployments/")[0]
    render(page, {"form-run": f"{ui}/runs/flow-run/{run_id}"}, out)
    return dict(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "screenshots")
    parser.add_argument("--minutes", type=float, default=0.5, help="the demo's training budget")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="prefect-ui-"))
    port = free_port()
    server, env = start_server(home, port)
    try:
        demo = [sys.executable, "-m", "unet_volume_flows.demo", "--out", str(home / "demo")]
        subprocess.run([*demo, "--minutes", str(args.minutes)], env=env, check=True, cwd=ROOT)
        api, ui = env["PREFECT_API_URL"], f"http://127.0.0.1:{port}"
        runs = {"sort": "START_TIME_DESC"}
        demo_run = newest(api, "flow_runs", {**runs, "flows": {"name": {"any_": ["demo"]}}})
        predict_run = newest(api, "flow_runs", {**runs, "flows": {"name": {"any_": ["predict"]}}})
        pages = {
            "demo-run": f"{ui}/runs/flow-run/{demo_run['id']}",
            "predict-run": f"{ui}/runs/flow-run/{predict_run['id']}",
        }
        for key in ("prediction-preview", "model-card", "prediction-progress", "model-metrics"):
            artifact = newest(
                api, "artifacts", {"sort": "CREATED_DESC", "artifacts": {"key": {"any_": [key]}}}
            )
            pages[key] = f"{ui}/artifacts/artifact/{artifact['id']}"
        serve = start_serve(env, home)
        try:
            pages.update(served_forms(api, ui))
            with browser_page() as page:
                render(page, pages, args.out)
                image, model = (str(home / "demo" / n) for n in ("isbi-volume.zarr", "model.pt"))
                values = [image, model, str(home / "from-form.zarr")]
                run = run_from_form(page, api, pages["predict-form"], values, args.out)
            print(f"run from the form: {run['state_type']}, parameters {run['parameters']}")
        finally:
            os.killpg(serve.pid, 15)
            serve.wait(timeout=60)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
