"""The image transforms every model here uses (training, evaluation, serving) and its tokenizer
equal open_clip 3.3.0's own for the same model config: ``create_model_and_transforms`` and
``get_tokenizer`` are the reference, never this package's code; and the published values (OpenAI's
normalisation, bicubic resize, TULIP's train crop at scale 0.9-1) are written out once here."""

import open_clip
import pytest
import torch

from tests.models.conftest import LONG
from tulip_pipelines.data.images import preprocess_size
from tulip_pipelines.models import (
    build_student,
    load_bundle,
    save_model,
    stretch_position_embedding,
)
from tulip_pipelines.models.clip import _preprocess, new_clip, train_preprocess
from tulip_pipelines.models.configs import register_tiny_configs

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def describe(transform) -> list[tuple[str, dict]]:
    """Each step of a Compose: its class and public settings (size, interpolation, scale,
    ratio, mean, std, antialias, ...)."""
    return [(type(t).__name__, {k: v for k, v in vars(t).items()
                                if not k.startswith("_") and k != "training"})
            for t in transform.transforms]


def open_clips(name: str):
    """open_clip's (train, eval) transforms of ``name``, its model built on the meta device (no
    weights, no memory)."""
    register_tiny_configs()
    with torch.device("meta"):
        _, train, val = open_clip.create_model_and_transforms(name, device="meta")
    return train, val


@pytest.mark.parametrize("name", ["TULIP-Tiny", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"])
def test_a_models_transforms_are_open_clips(name):
    train, val = open_clips(name)
    with torch.device("meta"):
        model = new_clip(name)
    assert describe(_preprocess(model)) == describe(val)
    assert describe(train_preprocess(model)) == describe(train)
    # what the evaluation decodes at (draft mode never below it) and the shards store
    assert preprocess_size(_preprocess(model)) == val.transforms[0].size


def test_the_published_transforms():
    """CLIP's eval transform (bicubic resize of the shortest side, centre crop, OpenAI's mean
    and std) and open_clip's train transform that TULIP's stage 2 uses
    (RandomResizedCrop at scale 0.9-1, bicubic)."""
    with torch.device("meta"):
        model = new_clip("ViT-L-14")
    steps = dict(describe(_preprocess(model)))
    assert list(steps) == ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor",
                           "Normalize"]
    assert steps["Resize"]["size"] == 224 and steps["Resize"]["interpolation"].value == "bicubic"
    assert tuple(steps["CenterCrop"]["size"]) == (224, 224)
    assert tuple(steps["Normalize"]["mean"]) == OPENAI_MEAN
    assert tuple(steps["Normalize"]["std"]) == OPENAI_STD
    steps = dict(describe(train_preprocess(model)))
    assert list(steps) == ["RandomResizedCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"]
    crop = steps["RandomResizedCrop"]
    assert tuple(crop["size"]) == (224, 224) and tuple(crop["scale"]) == (0.9, 1.0)
    assert crop["ratio"] == pytest.approx((3 / 4, 4 / 3), abs=1e-4)
    assert crop["interpolation"].value == "bicubic"
    assert tuple(steps["Normalize"]["mean"]) == OPENAI_MEAN


def test_every_derived_model_keeps_open_clips_transforms(teacher, tmp_path):
    """The teacher, its student, the Long-CLIP stretch and a model read back from its directory
    preprocess images as open_clip does (training, the evaluation and serving use these)."""
    train, val = open_clips("TULIP-Tiny")
    save_model(build_student(teacher, 248), tmp_path / "student")
    models = {"teacher": teacher, "student": build_student(teacher, 248),
              "longclip": stretch_position_embedding(teacher, 248, 20),
              "loaded": load_bundle(tmp_path / "student")}
    for what, bundle in models.items():
        assert describe(bundle.preprocess) == describe(val), what
        assert describe(train_preprocess(bundle.model)) == describe(train), what


def test_the_tokenizers_are_open_clips_at_77_and_248_tokens(teacher, student):
    """The teacher reads 77 tokens, the student and Long-CLIP 248; a longer caption is cut with
    its end-of-text token kept as the last one, as open_clip's tokenizer does."""
    longclip = stretch_position_embedding(teacher, 248, 20)
    for bundle, context in ((teacher, 77), (student, 248), (longclip, 248)):
        reference = open_clip.get_tokenizer("TULIP-Tiny", context_length=context)
        tokens = bundle.tokenizer([LONG, "a red circle."])
        assert tokens.shape == (2, context)
        assert torch.equal(tokens, reference([LONG, "a red circle."]))
        assert int(tokens[0, -1]) == reference.eot_token_id
    assert open_clip.get_tokenizer("ViT-L-14").context_length == 77  # CLIP's own context
