"""Checks of the whole parameter set, run by the project hook before a pipeline starts.

Each pipeline's parameters are validated by the dataclass its node builds from them; this module
runs those validators up front, for the pipelines in the run, and adds the checks that span
several pipelines (e.g. the student's context length against the teacher's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# pipeline name -> validator of params[<pipeline name>] (raises ValueError/TypeError on mistakes)
Validator = Callable[[dict[str, Any], dict[str, Any]], None]
VALIDATORS: dict[str, Validator] = {}


def validator(pipeline: str) -> Callable[[Validator], Validator]:
    def register(fn: Validator) -> Validator:
        VALIDATORS[pipeline] = fn
        return fn

    return register


def check_parameters(params: dict[str, Any], pipeline_names: set[str]) -> list[str]:
    """Run the validators of the pipelines about to run; return every problem found."""
    _register_builtin_validators()
    problems = []
    for name in sorted(pipeline_names & set(VALIDATORS)):
        try:
            VALIDATORS[name](params.get(name) or {}, params)
        except (ValueError, TypeError, KeyError) as err:
            problems.append(f"parameters of `{name}` (conf/*/parameters_{name}.yml): {err}")
    return problems


def _register_builtin_validators() -> None:
    """The parameter dataclasses of each pipeline (imported lazily: torch-free ones first)."""
    if VALIDATORS:
        return
    from tulip_pipelines.data.sharegpt4v import IngestConfig
    from tulip_pipelines.data.split import SplitConfig

    VALIDATORS["ingest"] = lambda p, _: IngestConfig.from_params(p)
    VALIDATORS["split"] = lambda p, _: SplitConfig.from_params(p)

    from tulip_pipelines.data.demo import DemoDataConfig

    VALIDATORS["demo_data"] = lambda p, _: DemoDataConfig.from_params(p)

    from tulip_pipelines.evaluation.evaluate import EvaluateConfig
    from tulip_pipelines.training.stages import STAGES, check_stage_params

    VALIDATORS["evaluate"] = lambda p, _: EvaluateConfig.from_params(p)
    for stage in STAGES:
        VALIDATORS[stage] = lambda p, all_params, stage=stage: check_stage_params(stage, p, all_params)
