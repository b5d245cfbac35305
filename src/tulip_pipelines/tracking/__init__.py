"""MLflow tracking of training and evaluation stages (this package only talks to MLflow; running a
stage is :mod:`tulip_pipelines.training.stages.base`).

``kedro run`` opens one MLflow run (kedro-mlflow; the *parent run*: named for the pipelines, the
environment and the start time, it holds every prefixed parameter and, after the evaluation, the
headline metrics and the report: :mod:`tulip_pipelines.hooks`). Each stage opens a *nested* run
named after it with its parameters (without the stage prefix: the same key means the same thing
in every stage run), the DeepSpeed config, its inputs as MLflow datasets, per-step curves (the
loss named after its kind; logged as they come, by the launched rank 0 too), system metrics and
its model directory (as plain files, and as a pyfunc MLflow model named after the stage,
registered in the Model Registry under the stage's ``registered_model_name``:
:mod:`tulip_pipelines.serving.pyfunc`). The evaluation adds each model's recall to the run that
trained it (``eval/<benchmark>/<direction>_r<k>``) and moves the ``champion`` alias.
Outside Kedro a stage logs only when a tracking URI is configured (``MLFLOW_TRACKING_URI``);
otherwise nothing is logged. Only rank 0 ever calls this package.

:mod:`.stage_runs` (a stage's run, its inputs as MLflow datasets, what it logs), :mod:`.results`
(the evaluation's metrics, tags, alias and headline), :mod:`.server` (is the tracking server
there, checked before a run; imports no MLflow).
"""
