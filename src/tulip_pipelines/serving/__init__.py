"""Using a trained model outside the pipelines (no Kedro): embeddings of texts and images
(:mod:`.embed`), the model as an MLflow ``pyfunc`` model for the registry and
``mlflow models serve`` (:mod:`.pyfunc`), ``models:/`` URIs (:mod:`.registry`) and the image
embeddings of a folder, computed once (:mod:`.image_cache`). The commands are
:mod:`tulip_pipelines.commands`."""
