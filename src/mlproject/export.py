"""`mlproject export <model> DIR`: a standalone Hugging Face folder of any model reference.

    mlproject export runs:/<run_id>/model ./mistral-q4          # a recipe re-made, an adapter merged
    mlproject export models:/mistral-cr@best_acc ./best --max-shard-size 2GB
    mlproject export ./tiny ./tiny-bf16 --dtype bfloat16 --force

DIR then loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``, no mlproject installed: sharded safetensors
(``model-0000x-of-0000n.safetensors`` + ``model.safetensors.index.json``, or one
``model.safetensors``), config.json with ``mlproject_lineage`` (the reference exported, the chain of
upstream models and runs, root model, dtypes, mlproject version), generation_config.json, the
tokenizer files, and ``mlproject_model.json`` (mlproject's own loading keeps the lineage). A PEFT
adapter is merged into its base; a recipe (quantize / prune ``store=recipe``) is re-made and
checked against its digest; a packed quantized checkpoint (gptq, awq, auto-round, bitsandbytes
weights) is copied as written. At 7B the folder is ~14.5 GB in bfloat16.

The command reads the tracking server (``runs:/`` / ``models:/`` references) and records nothing
on it. Bad input (unknown reference, DIR not empty without --force, a model that cannot be a
standalone folder) is one line and exit code 2, before any weights load.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)

DTYPE_HELP = ("dtype of the written weights: float32, bfloat16 or float16 (default: the lineage's root checkpoint's "
              "own dtype, read from its config.json, e.g. bfloat16 for a bf16 hub model; on CPU mlproject's steps "
              "work in float32, and an export never writes that upcast unless asked)")
DEVICE_HELP = ("where the model loads: auto, cpu, cuda, cuda:N (default: the device a recipe was made on, so its digest "
               "check holds; else auto)")
SHARD_HELP = "largest safetensors shard, e.g. 5GB, 500MB (powers of 10, as transformers counts; default: 5GB)"


def add_parser(sub) -> None:
    from mlproject.models.export import DEFAULT_SHARD_SIZE

    p = sub.add_parser("export", help="write a model reference as a standalone Hugging Face folder (real weights)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(step="export")
    p.add_argument("model", metavar="MODEL",
                   help="model reference: runs:/<run_id>/model, models:/<name>@<alias>, a local folder, alias or hub id")
    p.add_argument("out_dir", metavar="DIR", help="folder to write (new or empty; see --force)")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"], metavar="DTYPE",
                   help=DTYPE_HELP)
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, help=SHARD_HELP)
    p.add_argument("--device", default="", help=DEVICE_HELP)
    p.add_argument("--force", action="store_true", help="replace DIR when it exists and is not empty")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI for runs:/ and models:/ references (default: $MLFLOW_TRACKING_URI)")


def main(args: argparse.Namespace) -> int:
    from mlproject import tracking
    from mlproject.errors import UserError
    from mlproject.models import export, loading
    from mlproject.models.reference import resolve

    try:
        ref = resolve(args.model)
        export.check_out_dir(args.out_dir, args.force)
        export.parse_shard_size(args.max_shard_size)
        if args.device:
            loading.pick_device(args.device)
        if ref.kind in ("run", "registry"):
            tracking.check_server(args.tracking_uri or None)
            tracking.check_model_uri(ref.target)
        elif ref.kind in ("hub", "alias") and not ref.gguf:
            from mlproject.models import hub

            hub.check_model(ref.raw, ref.target)
        p = export.plan(args.model, args.out_dir, dtype=args.dtype, device=args.device,
                        max_shard_size=args.max_shard_size, force=args.force, fetch=tracking.download)
        log.info("exporting %s to %s in %s%s", ref.raw, p.out_dir, p.packed or p.dtype,
                 f" (the root checkpoint's, {p.chain[-1].ref})" if not args.dtype and p.root_dtype else "")
        done = export.export(p, fetch=tracking.download)
    except UserError as exc:
        print(f"error: {tracking.redact(exc)}", file=sys.stderr)
        return exc.exit_code
    shards = [f for f in done.files if f.endswith(".safetensors")]
    print(f"{done.out_dir}: {len(shards)} safetensors file(s), {done.bytes / 1e6:.1f} MB, "
          f"{'packed ' + done.dtype + ' checkpoint copied' if done.copied else done.dtype}"
          f"{', adapter merged' if done.merged_adapter else ''}; load with "
          f"AutoModelForCausalLM.from_pretrained({str(done.out_dir)!r})")
    return 0
