"""Screenshots of what a person sees in the MLflow UI: the runs table (as it opens, and through the
"Headline numbers" view the commands link to), the experiment's Models tab and the run pages of
a step and of the pipeline, after a real (quick) demo pipeline.

    python scripts/ui_screenshots.py                      # -> ui-screenshots/*.png
    python scripts/ui_screenshots.py --out /tmp/shots --set "limit=20 ppl_windows=2 recovered.max_steps=5"
    python scripts/ui_screenshots.py --uri http://127.0.0.1:5000   # a running server with a `demo` experiment

It starts a throwaway ``mlflow server`` (SQLite + local artifacts under a temporary folder),
runs ``pipelines/demo.yaml`` on SmolLM2 with quick settings (``--set``), then drives headless
Chromium (Debian package ``chromium``: ``apt-get install chromium``) over the UI and saves
PNGs. The server and the browser are stopped at the end. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # mlflow_server: the tests' throwaway server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]
QUICK = "limit=20 ppl_windows=2 recovered.max_steps=5"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("headless Chromium is needed: apt-get install chromium")


def screenshot(url: str, out: Path, size: str = "1600,1000", wait_ms: int = 20000) -> Path:
    """One PNG of ``url`` after the page's scripts had ``wait_ms`` of (virtual) time to render."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    return out


def api(uri: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our own local server
        return json.loads(resp.read())


def populate(uri: str, overrides: str) -> str:
    """Run the demo pipeline against ``uri``; returns the experiment id."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "MLPROJECT_PROGRESS": "log", "MLPROJECT_PROGRESS_INTERVAL": "30"}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "mlproject", "run", "pipelines/demo.yaml"] + (["--set", overrides] if overrides else [])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return api(uri, "experiments/search", {"filter": "name = 'demo'", "max_results": 10})["experiments"][0]["experiment_id"]


def take(uri: str, experiment_id: str, out: Path) -> list[Path]:
    runs = api(uri, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]

    def tag(run, key):
        return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)

    by_step = {}
    for run in runs:
        by_step.setdefault(tag(run, "mlproject.pipeline_step") or tag(run, "mlproject.step"), run["info"]["run_id"])
    base = f"{uri}/#/experiments/{experiment_id}"
    shots = [screenshot(f"{base}/runs", out / "runs_table.png"),
             # the saved view every step keeps up to date (the link commands print)
             screenshot(f"{base}/runs?viewStateShareKey=mlproject-headline", out / "runs_table_headline_view.png",
                        size="2400,900"),
             screenshot(f"{base}/models", out / "models_tab.png")]
    for step, name in (("base", "run_page_evaluate.png"), ("rtn_w4", "run_page_quantize.png"),
                       ("pipeline", "run_page_pipeline.png")):
        if step in by_step:
            shots.append(screenshot(f"{base}/runs/{by_step[step]}", out / name, size="1600,1400"))
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ui-screenshots", help="folder for the PNGs")
    parser.add_argument("--set", default=QUICK, help="overrides for the demo pipeline (quick by default)")
    parser.add_argument("--uri", default="", help="an existing server with a `demo` experiment (nothing is run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium()
    if args.uri:
        exp = api(args.uri, "experiments/search", {"filter": "name = 'demo'", "max_results": 10})["experiments"]
        shots = take(args.uri, exp[0]["experiment_id"], out)
    else:
        from mlflow_server import start_server

        with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as tmp, start_server(tmp) as uri:
            shots = take(uri, populate(uri, args.set), out)
    for shot in shots:
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
