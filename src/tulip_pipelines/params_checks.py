"""Checks of the whole parameter set, run by the project hook before a pipeline starts.

Each pipeline reads ``params:<pipeline>`` through one :class:`~tulip_pipelines.params.Params`
class, which checks its own values and (``check_with``) the rules that span pipelines. This
module maps pipeline names to those classes and runs them for the pipelines of a run, plus the
shared parameters of ``parameters.yml``. The nodes build the same objects from their inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from tulip_pipelines.params import Params, Problems

NOT_READ = object()  # a shared parameter that the pipelines of a run do not read


@dataclass
class SharedParams(Params):
    """The top-level keys of ``parameters.yml`` that several pipelines read."""

    section = "parameters"

    image_root: Any = NOT_READ
    teacher_model_name: Any = NOT_READ  # null is allowed (prepare_images then needs a size)

    def __post_init__(self) -> None:
        p = Problems(self.section)
        if self.image_root is not NOT_READ:
            p.check(isinstance(self.image_root, str) and bool(self.image_root), "image_root",
                    f"must be a non-empty path, got {self.image_root!r}")
        if self.teacher_model_name not in (NOT_READ, None):
            from tulip_pipelines.models.configs import check_model_name

            try:
                check_model_name(self.teacher_model_name)
            except ValueError as err:
                p.add("teacher_model_name", str(err))
        p.raise_if_any()


def params_classes() -> dict[str, type[Params]]:
    """Pipeline name -> the parameter class of ``params:<name>`` (imported here, lazily, so that
    the hook imports torch only when a run has training pipelines)."""
    from tulip_pipelines.data.demo import DemoDataParams
    from tulip_pipelines.data.ingest import IngestParams
    from tulip_pipelines.data.prepare import PrepareImagesParams
    from tulip_pipelines.data.split import SplitParams
    from tulip_pipelines.evaluation.evaluate import EvaluateParams
    from tulip_pipelines.training.stages import PIPELINE_PARAMS

    classes: dict[str, type[Params]] = {
        "demo_data": DemoDataParams,
        "ingest": IngestParams,
        "split": SplitParams,
        "prepare_images": PrepareImagesParams,
        "evaluate": EvaluateParams,
    }
    classes.update(PIPELINE_PARAMS)
    return classes


def check_parameters(params: Mapping[str, Any], pipeline_names: Iterable[str],
                     shared: Iterable[str] = ()) -> list[str]:
    """Every problem with the parameters of the pipelines about to run, and with the shared
    parameters ``shared`` (top-level keys) that they read."""
    problems = []
    classes = params_classes()
    for name in sorted(set(pipeline_names) & set(classes)):
        try:
            classes[name].from_all(params).check_with(params)
        except (ValueError, TypeError, KeyError) as err:
            problems.append(f"parameters of `{name}` (conf/*/parameters_{name}.yml): {err}")
    shared = sorted(set(shared) & {f.name for f in fields(SharedParams)})
    if shared:
        try:
            SharedParams.from_params({k: params.get(k) for k in shared})
        except (ValueError, TypeError) as err:
            problems.append(f"shared parameters (conf/*/parameters.yml): {err}")
    return problems
