"""Every image transform at its edges: inputs smaller than, equal to and larger than its target
size, square and not. The draft decoder (data/images.py), the shard encoder that resizes the
shortest side (data/shards.py) and the model's preprocess as training reads an image."""

import io

import pytest
import torch
from PIL import Image

from tulip_pipelines.data.images import FolderImages, open_image_file
from tulip_pipelines.data.shards import Encoding, encode_image
from tulip_pipelines.models import create_teacher
from tulip_pipelines.training.datasets import CaptionImageDataset

TARGET = 48  # TULIP-Tiny's input size
# (width, height): smaller, equal and larger than the target, square and elongated both ways
SIZES = [(20, 20), (30, 90), (90, 30), (48, 48), (48, 96), (96, 48), (47, 300), (400, 300),
         (1000, 49), (49, 1000)]


def _jpeg(path, size):
    # a gradient, not a flat colour: a resampling bug shows in the pixels too
    x = torch.linspace(0, 255, size[0]).round().to(torch.uint8)
    pixels = x.expand(size[1], size[0]).unsqueeze(-1).expand(-1, -1, 3).contiguous().numpy()
    Image.fromarray(pixels).save(path, quality=95)
    return path


@pytest.mark.parametrize("size", SIZES)
def test_draft_decoding_never_goes_below_the_size_asked_for(tmp_path, size):
    image = open_image_file(_jpeg(tmp_path / "x.jpg", size), TARGET)
    assert image.mode == "RGB"
    short, original_short = min(image.size), min(size)
    # the draft scale keeps both sides >= the target, and never enlarges
    assert short >= min(TARGET, original_short)
    assert image.size[0] <= size[0] and image.size[1] <= size[1]
    # the aspect survives (DCT scaling rounds each side up to a whole block at most)
    assert image.size[0] / image.size[1] == pytest.approx(size[0] / size[1], rel=0.15)
    if original_short < 2 * TARGET:  # no power-of-two scale fits: decoded at full size
        assert image.size == size


@pytest.mark.parametrize("size", SIZES)
def test_shards_resize_the_shortest_side_to_the_size_and_never_upscale(tmp_path, size):
    data = encode_image(_jpeg(tmp_path / "x.jpg", size), Encoding(TARGET, 95, "4:4:4"))
    with Image.open(io.BytesIO(data)) as stored:
        width, height = stored.size
        assert stored.format == "JPEG"
    if min(size) <= TARGET:
        assert (width, height) == size  # small and equal images are kept as they are
    else:
        assert min(width, height) == TARGET
        assert width / height == pytest.approx(size[0] / size[1], rel=0.05, abs=1 / TARGET)


@pytest.fixture(scope="module")
def preprocess():
    return create_teacher("TULIP-Tiny").preprocess


@pytest.mark.parametrize("size", SIZES)
def test_training_reads_every_size_as_the_models_input(tmp_path, preprocess, size):
    import pandas as pd

    _jpeg(tmp_path / "x.jpg", size)
    frame = pd.DataFrame({"id": ["a"], "image": ["x.jpg"], "caption": ["A caption."]})
    sample = CaptionImageDataset(frame, FolderImages(tmp_path), preprocess)[0]
    assert sample["image"].shape == (3, TARGET, TARGET)
    assert torch.isfinite(sample["image"]).all()
    # draft decoding changes nothing the model sees beyond JPEG's own rounding
    with Image.open(tmp_path / "x.jpg") as full:
        reference = preprocess(full.convert("RGB"))
    assert (sample["image"] - reference).abs().mean() < 0.05


def test_full_decoding_is_the_originals_decode_and_bicubic_resize(tmp_path):
    path = _jpeg(tmp_path / "x.jpg", (400, 300))
    full = encode_image(path, Encoding(TARGET, 95, "4:4:4", draft=False))
    with Image.open(path) as image:
        reference = image.convert("RGB").resize((64, TARGET), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    reference.save(out, "JPEG", quality=95, subsampling="4:4:4")
    assert full == out.getvalue()
    assert encode_image(path, Encoding(TARGET, 95, "4:4:4")) != full  # draft: decoded at 1/4


def test_the_original_files_read_in_full_when_draft_decoding_is_off(tmp_path):
    from tulip_pipelines.data.images import image_source_from_dict

    _jpeg(tmp_path / "x.jpg", (400, 300))
    assert FolderImages(tmp_path).open("x.jpg", TARGET).size == (100, 75)  # DCT scale 1/4
    full = image_source_from_dict(FolderImages(tmp_path, draft=False).to_dict())
    assert full.open("x.jpg", TARGET).size == (400, 300)
    assert FolderImages(tmp_path).to_dict() == {"kind": "folder", "root": str(tmp_path)}


def test_the_train_augmentation_draws_anew_each_epoch_and_validation_does_not_augment(tmp_path):
    import pandas as pd

    from tulip_pipelines.models.clip import train_preprocess
    from tulip_pipelines.training.datasets import SeededSamples

    # square: RandomResizedCrop at scale 0.9-1 and aspect 3/4-4/3 finds no crop in a 3:2 image
    # and falls back to a fixed centre crop (so do the originals)
    _jpeg(tmp_path / "x.jpg", (100, 100))
    frame = pd.DataFrame({"id": ["a"], "image": ["x.jpg"], "caption": ["A caption."]})
    model = create_teacher("TULIP-Tiny")
    augmented = SeededSamples(CaptionImageDataset(frame, FolderImages(tmp_path),
                                                  train_preprocess(model.model)), seed=0)
    epoch0, again, epoch1 = (augmented[(0, e)]["image"] for e in (0, 0, 1))
    assert epoch0.shape == (3, TARGET, TARGET)
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)
    plain = SeededSamples(CaptionImageDataset(frame, FolderImages(tmp_path), model.preprocess),
                          seed=0)
    assert torch.equal(plain[(0, 0)]["image"], plain[(0, 1)]["image"])
