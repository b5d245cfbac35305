"""tulip_pipelines: TULIP (Token-length Upgraded CLIP) as reproducible Kedro pipelines.

The ML core (``data``, ``models``, ``training``, ``evaluation``) is plain Python and PyTorch and
imports without Kedro. ``load_model`` is the one-call entry point for trained models.
"""

__version__ = "0.1.0"


def load_model(path, device="cpu", **original_kwargs):
    """Load a model exported by this project (its directory, or an MLflow URI such as
    ``models:/tulip-expanded/latest``), or a published TULIP ``epoch_N.pt`` (name its teacher
    with ``teacher=``/``pretrained=``). Returns ``(model, preprocess, tokenizer)``.
    See :mod:`tulip_pipelines.models.files` and :mod:`tulip_pipelines.serving.registry`.
    """
    from tulip_pipelines.serving.registry import resolve_bundle

    return resolve_bundle(path, device=device, **original_kwargs).as_tuple()


__all__ = ["load_model", "__version__"]
