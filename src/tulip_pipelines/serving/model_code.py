"""The pyfunc model's code, as MLflow's "models from code" reads it (copied into every logged
model and run when it is loaded): :class:`~tulip_pipelines.serving.pyfunc.TulipEmbedder`."""

from mlflow.models import set_model

from tulip_pipelines.serving.pyfunc import TulipEmbedder

set_model(TulipEmbedder())
