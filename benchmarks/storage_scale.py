"""What a study costs in disk, network and loads: the quantize and compress_recover searches
(8 trials each) and the demo pipeline, stored as recipes (today's default) and as weights with no
in-memory hand-off (``store=weights``, the scorer and the next step reading the store: the
behaviour before recipes), then both extrapolated to Mistral-7B by parameter ratio.

Each workload runs in its own process against its own real ``mlflow server`` (artifacts proxied
to a folder, as a team server's are), with a fresh cache and temp folder. Counted:

* stored — model bytes the server's artifact store gained (the logged models the steps
  uploaded; reports and results are shown apart, not scaled);
* downloaded — bytes fetched through ``mlflow.artifacts.download_artifacts``;
* written — model bytes written to local disk: every ``save_pretrained`` (outputs, merges,
  trainer checkpoints), ``torch.save`` (optimizer states) and download; disk peak / left — the
  largest and the final size of the cache, temp and output folders, sampled every 0.5 s (the base
  model, converted once outside the measurement, is not counted: at 7B it is the hub cache's copy);
* loads — checkpoints read by ``models.loading.load_model`` (``loading.LOADS``) per trial;
* peak RSS of the process.

At 7B every byte figure is multiplied by 7.24e9 / the model's parameter count, except the model
bytes a recipe run stores, which are multiplied by the ratio of layers × (hidden + intermediate)
(what prune's indices and a LoRA adapter grow with; an RTN or bnb recipe does not grow at all).
Both keep the dtype measured: CPU runs are float32, so the weights columns are twice what bf16
on a GPU would hold. Targets at 7B:
<= 1 MB stored per RTN or prune trial, the adapter alone per LoRA trial, one load per trial, the
cache never above its cap, and a 40-trial compress_recover search well under 100 GB of disk.

The searches are the shipped spaces narrowed to what runs on a CPU in minutes (RTN for the
quantize space, 5 recovery steps, 20 documents per task); ``--quick`` uses a tiny random model.

    python benchmarks/storage_scale.py                        # SmolLM2, both modes, all workloads
    python benchmarks/storage_scale.py --quick                # a tiny random Llama: seconds
    python benchmarks/storage_scale.py --workloads quantize --modes recipe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # mlflow_server.start_server, tiny

MISTRAL_PARAMS = 7.24e9
MISTRAL_SHAPE = 32 * (4096 + 14336)  # layers × (hidden + intermediate): what adapters and prune indices grow with
WORKLOADS = ("quantize", "compress_recover", "demo")
GB = 1e9


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class DiskSampler(threading.Thread):
    def __init__(self, roots: list[Path]):
        super().__init__(daemon=True)
        self.roots, self.peak, self.stop = roots, 0, threading.Event()

    def now(self) -> int:
        return sum(du(r) for r in self.roots if r.exists())

    def run(self):
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, self.now())


def spaces(work: Path, model: str, quick: bool) -> dict[str, tuple[Path, str]]:
    """(space file, --set) per search: the shipped spaces narrowed to minutes of CPU."""
    import yaml

    docs = "tasks=offline ppl_dataset=offline limit=20 ppl_windows=2 seqlen=128 batch_size=8"
    quant = yaml.safe_load((ROOT / "pipelines/spaces/quantize.yaml").read_text())
    quant.update(pipeline=str(ROOT / quant["pipeline"]), n_trials=8, sampler={"type": "tpe", "seed": 0},
                 params={"rtn_w4.method": ["rtn"], "rtn_w4.w_bits": [2, 3, 4, 8],
                         "rtn_w4.group_size": [16, 32] if quick else [32, 64],
                         "rtn_w4.scheme": ["symmetric", "asymmetric"]})
    rec = yaml.safe_load((ROOT / "pipelines/spaces/compress_recover.yaml").read_text())
    rec.update(pipeline=str(ROOT / rec["pipeline"]), n_trials=8, sampler={"type": "tpe", "seed": 0},
               objectives=["best_acc"], params={
                   "pruned.ratio": {"float": [0.15, 0.25], "step": 0.05},
                   "pruned.targets": ["mlp", "both"],
                   "recovered.lora_r": [8, 16], "recovered.lr": {"log_float": [1.0e-5, 5.0e-4]}})
    out = {}
    for name, doc in (("quantize", quant), ("compress_recover", rec)):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        extra = ("calibration=offline" if name == "quantize" else
                 "pruned.calibration=offline pruned.calibration_samples=4 recovered.dataset=offline:sft_text "
                 "recovered.max_steps=5 recovered.train_batch_size=2 recovered.max_length=128")
        out[name] = (path, f"{docs} {extra}")
    return out


def one(args) -> dict:
    """One workload in one mode, in this process (the parent runs each in its own)."""
    work = Path(args.work)
    os.environ["MLPROJECT_CACHE"] = str(work / "cache")
    # the base model converted from its GGUF once, outside what is measured (at 7B it is the hub cache's copy)
    (work / "cache").mkdir(parents=True, exist_ok=True)
    Path(args.shared, "models").mkdir(parents=True, exist_ok=True)
    os.symlink(Path(args.shared, "models"), work / "cache" / "models")
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(work / "tmp")
    os.chdir(work)  # outputs/finetune lands here
    import psutil

    import mlflow
    from mlflow_server import start_server

    from mlproject.models import loading
    from mlproject.tracking import artifacts

    model = args.model
    if args.quick:
        import tiny

        model = str(tiny.save_tiny(work / "tinymodel", "llama", num_hidden_layers=4))
    downloaded = [0]
    original = mlflow.artifacts.download_artifacts

    def counting(*a, **k):
        got = original(*a, **k)
        downloaded[0] += du(Path(got)) if Path(got).is_dir() else Path(got).stat().st_size
        return got

    mlflow.artifacts.download_artifacts = counting
    saved = count_saves()
    if args.mode == "weights":
        loading.hand_off = lambda uri, loaded, device: None  # every consumer reads the store
    loading.LOADS.clear()
    sampler = DiskSampler([work / "cache", work / "tmp", work / "outputs"])
    proc = psutil.Process()
    io0 = proc.io_counters()
    with start_server(work / "server") as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        store = work / "server" / "artifacts"
        stored0 = du(store)
        sampler.start()
        start = time.perf_counter()
        store_set = " store=weights" if args.mode == "weights" else ""
        trials = 1
        if args.workload == "demo":
            from mlproject.pipeline import runner
            from mlproject.pipeline.config import PipelineConfig

            demo_set = "limit=20 ppl_windows=2 seqlen=128 recovered.max_steps=5" + (f" model={model}" if args.quick else "")
            if args.quick:
                demo_set += " rtn_w4.group_size=16"
            runner.run(PipelineConfig(pipeline=str(ROOT / "pipelines/demo.yaml"), set=demo_set + store_set,
                                      tracking_uri=uri, experiment="storage-demo"))
        else:
            from mlproject.search import study
            from mlproject.search.config import SearchConfig

            space, sets = spaces(work, model, args.quick)[args.workload]
            trials = args.n_trials
            study.run(SearchConfig(space=str(space), model=model, set=sets + store_set, n_trials=trials,
                                   study=f"storage-{args.workload}", experiment=f"storage-{args.workload}",
                                   storage=f"sqlite:///{work}/optuna.db", tracking_uri=uri, heartbeat=0,
                                   register_weights=False))
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        stored = du(store) - stored0
        model_stored = sum(du(d) for d in store.glob("*/models"))
    io1 = proc.io_counters()
    params = params_of(model)
    from mlproject.models import loading as _l
    from mlproject.models.reference import resolve as _r

    conf = _l.peek_config(_r(model))
    shape = conf.num_hidden_layers * (conf.hidden_size + conf.intermediate_size)
    return {"workload": args.workload, "mode": args.mode, "model": args.model if not args.quick else "tiny",
            "params": params, "shape": shape, "trials": trials, "stored": model_stored, "stored_other": stored - model_stored,
            "downloaded": downloaded[0], "written": saved[0] + downloaded[0],
            "written_all": io1.write_chars - io0.write_chars, "read": io1.read_chars - io0.read_chars,
            "disk_peak": max(sampler.peak, sampler.now()), "disk_left": sampler.now(),
            "cache_now": artifacts.cache_bytes() if hasattr(artifacts, "cache_bytes") else du(work / "cache" / "artifacts"),
            "loads": len(loading.LOADS), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "wall": wall}


def count_saves() -> list[int]:
    """Bytes of model files written: every save_pretrained (transformers, peft: checkpoints, step
    outputs, merges) and torch.save (optimizer states), measured on disk after the call."""
    import peft
    import torch
    import transformers

    total = [0]

    def wrap_dir(cls):
        original = cls.save_pretrained

        def save_pretrained(self, save_directory, *a, **k):
            before = du(Path(save_directory)) if Path(save_directory).exists() else 0
            out = original(self, save_directory, *a, **k)
            total[0] += du(Path(save_directory)) - before
            return out

        cls.save_pretrained = save_pretrained

    wrap_dir(transformers.PreTrainedModel)
    wrap_dir(peft.PeftModel)
    original_save = torch.save

    def save(obj, f, *a, **k):
        out = original_save(obj, f, *a, **k)
        if isinstance(f, (str, os.PathLike)) and Path(f).is_file():
            total[0] += Path(f).stat().st_size
        return out

    torch.save = save
    return total


def params_of(model: str) -> int:
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    ref = resolve(model)
    n = loading.estimate_params(ref)
    if n:
        return int(n)
    loaded = loading.load_model(ref, dtype="float32", device="cpu")
    return loading.count_params(loaded.model)


def fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def report(rows: list[dict]) -> None:
    by = {(r["workload"], r["mode"]): r for r in rows}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        w, rc = by.get((workload, "weights")), by.get((workload, "recipe"))
        first = rc or w
        ratio = MISTRAL_PARAMS / first["params"]
        shape_ratio = MISTRAL_SHAPE / first["shape"]
        n = first["trials"]
        print(f"\n{workload} on {first['model']} ({first['params'] / 1e6:.1f} M parameters, {n} "
              f"{'trials' if n > 1 else 'run'}; x{ratio:.0f} to Mistral-7B, x{shape_ratio:.1f} for stored recipes)")
        print(f"  {'':24s}{'weights (before)':>18s}{'recipes (now)':>16s}{'weights @7B':>14s}{'recipes @7B':>14s}")
        for key, label, per in (("stored", "model bytes stored / trial", True),
                                ("downloaded", "downloaded / trial", True),
                                ("written", "model bytes written / trial", True), ("disk_peak", "disk peak", False),
                                ("disk_left", "disk left after", False)):
            vals = [(r[key] / (r["trials"] if per else 1)) if r else None for r in (w, rc)]
            # recipes and adapters grow with layers × (hidden + intermediate), weights with the parameters
            scale = (ratio, shape_ratio if key == "stored" else ratio)
            cells = [fmt(v) if v is not None else "-" for v in vals] + \
                    [fmt(v * k) if v is not None else "-" for v, k in zip(vals, scale)]
            print(f"  {label:24s}" + "".join(f"{c:>{wd}s}" for c, wd in zip(cells, (18, 16, 14, 14))))
        other = [fmt(r["stored_other"] / r["trials"]) if r else "-" for r in (w, rc)]
        print(f"  {'other artifacts / trial':24s}{other[0]:>18s}{other[1]:>16s}   (reports, results: not scaled)")
        loads = [f"{r['loads'] / r['trials']:.2f}" if r else "-" for r in (w, rc)]
        print(f"  {'loads per trial':24s}{loads[0]:>18s}{loads[1]:>16s}")
        rss = [fmt(r["peak_rss"]) if r else "-" for r in (w, rc)]
        print(f"  {'peak RSS':24s}{rss[0]:>18s}{rss[1]:>16s}")
        if rc and workload != "demo":
            def forty(r):
                return r["disk_peak"] * ratio + r["stored"] / r["trials"] * 40 * (
                    shape_ratio if r["mode"] == "recipe" else ratio)

            print(f"  a 40-trial search at 7B: ~{fmt(forty(rc))} with recipes"
                  + (f", ~{fmt(forty(w))} with weights" if w else "")
                  + " (local disk peak + 40 trials' stored model bytes; target well under 100 GB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default="weights,recipe")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return 0
    rows = []
    shared = tempfile.mkdtemp(prefix="storage-base-")
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            with tempfile.TemporaryDirectory(prefix=f"storage-{workload}-{mode}-") as work:
                cmd = [sys.executable, __file__, "--one", "--workload", workload, "--mode", mode, "--work", work,
                       "--model", args.model, "--n-trials", str(args.n_trials), "--shared", shared] + (["--quick"] if args.quick else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(f"{workload} ({mode}) failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(line[len("RESULT "):]))
                print(f"{workload} ({mode}): done in {rows[-1]['wall']:.0f} s", file=sys.stderr)
    import shutil

    shutil.rmtree(shared, ignore_errors=True)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
