"""`main` / `mlproject run`: the pipeline command's options (the CLI flags and MLproject parameters)."""

from __future__ import annotations

from dataclasses import dataclass

from mlproject.config import RunOptions
from mlproject.params import coerce_fields, param


@dataclass
class PipelineConfig(RunOptions):
    """`main` / `mlproject run`: a pipeline of steps from a YAML file, recorded as a parent run
    with one child run per step; steps whose result already exists are reused."""

    pipeline: str = param("pipelines/demo.yaml", "pipeline YAML file (or a name in pipelines/, e.g. demo)",
                          positional=True)
    set: str = param("", "overrides: key=value (every step that has the parameter) or <step>.key=value "
                     "(one step); several separated by spaces (quote values with spaces), or --set repeated",
                     repeat=True, empty="none")
    dry_run: bool = param(False, "print the resolved steps, their keys and what would be reused; run nothing")
    no_reuse: bool = param(False, "recompute every step, even those whose result exists")
    rerun: str = param("", "comma list of steps to recompute, with every step that depends on them", empty="none")
    skip: str = param("", "comma list of steps to leave out, with every step that uses their model; their "
                      "${step.run_id} entries drop out of comma lists (e.g. a compare step's runs)", empty="none")

    def __post_init__(self):
        coerce_fields(self)
