"""A folder's image embeddings are computed once per image tower: unchanged files come from the
cache, new or changed ones are encoded again, files gone are dropped, and a file that is not an
image is skipped with its reason and counted."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving.conftest import image_bytes
from tulip_pipelines.models import create_teacher, load_bundle
from tulip_pipelines.serving.image_cache import CACHE_DIR, folder_embeddings


@pytest.fixture(scope="module")
def bundle(model_dir):
    return load_bundle(model_dir)


def expected(bundle, path) -> np.ndarray:
    """The image tower's feature of one file, computed here from the model itself."""
    with Image.open(path) as image, torch.no_grad():
        pixels = bundle.preprocess(image.convert("RGB")).unsqueeze(0)
        return bundle.model.encode_image(pixels, normalize=True)[0].numpy()


def write(path, colour, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, fmt=fmt))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    write(root / "red.bmp", (200, 20, 20), fmt="BMP")  # uncompressed: its size never changes
    write(root / "green.jpg", (20, 160, 20), fmt="JPEG")
    write(root / "trip" / "blue.png", (20, 20, 200))
    (root / "notes.txt").write_text("not an image")
    return root


def check_rows(bundle, found):
    for name, row in zip(found.paths, found.features.numpy()):
        assert np.allclose(row, expected(bundle, found.folder / name), atol=1e-5), name


def test_a_second_call_reads_every_embedding_from_the_cache(bundle, folder):
    first = folder_embeddings(bundle, folder, batch_size=2)
    assert first.paths == ["green.jpg", "red.bmp", "trip/blue.png"]
    assert list(first.skipped) == ["notes.txt"] and "UnidentifiedImageError" in \
        first.skipped["notes.txt"]
    assert (first.encoded, first.cached) == (3, 0)  # images only: notes.txt is neither
    check_rows(bundle, first)
    assert len(list((folder / CACHE_DIR).iterdir())) == 1

    second = folder_embeddings(bundle, folder, batch_size=2)
    assert (second.encoded, second.cached) == (0, 3)
    assert second.paths == first.paths and list(second.skipped) == ["notes.txt"]
    assert torch.equal(second.features, first.features)
    assert "4 files in" in second.summary() and "3 images, 1 skipped (not images)" in \
        second.summary()


def test_changed_new_and_removed_files_are_seen(bundle, folder):
    folder_embeddings(bundle, folder)
    before = os.stat(folder / "red.bmp")
    write(folder / "red.bmp", (250, 250, 0), fmt="BMP")  # now yellow: same size, newer
    os.utime(folder / "red.bmp", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.stat(folder / "red.bmp").st_size == before.st_size
    write(folder / "white.png", (250, 250, 250))
    (folder / "trip" / "blue.png").unlink()
    found = folder_embeddings(bundle, folder)
    assert found.paths == ["green.jpg", "red.bmp", "white.png"]
    assert (found.encoded, found.cached) == (2, 1)  # red and white; green cached (not notes)
    check_rows(bundle, found)


def test_another_image_tower_has_its_own_cache(bundle, folder):
    folder_embeddings(bundle, folder)
    torch.manual_seed(1)
    other = create_teacher("TULIP-Tiny")
    found = folder_embeddings(other, folder)
    assert (found.encoded, found.cached) == (3, 0)
    check_rows(other, found)
    assert len(list((folder / CACHE_DIR).iterdir())) == 2


def test_a_folder_without_images_gives_no_rows(bundle, tmp_path):
    (tmp_path / "a.txt").write_text("text")
    found = folder_embeddings(bundle, tmp_path)
    assert found.paths == [] and list(found.skipped) == ["a.txt"]
    assert (found.encoded, found.cached) == (0, 0)
    again = folder_embeddings(bundle, tmp_path)
    assert (again.encoded, again.cached) == (0, 0) and list(again.skipped) == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        folder_embeddings(bundle, tmp_path / "missing")



def test_a_file_of_another_size_with_the_same_time_is_encoded_again(bundle, folder):
    folder_embeddings(bundle, folder)
    before = os.stat(folder / "green.jpg")
    write(folder / "green.jpg", (250, 250, 0), fmt="PNG")  # another size ...
    os.utime(folder / "green.jpg", ns=(before.st_atime_ns, before.st_mtime_ns))  # ... same time
    assert os.stat(folder / "green.jpg").st_size != before.st_size
    found = folder_embeddings(bundle, folder)
    assert (found.encoded, found.cached) == (1, 2)  # the three images; notes.txt is skipped
    check_rows(bundle, found)


def test_the_cache_file_is_keyed_by_the_image_tower_its_preprocess_and_the_autocast(bundle,
                                                                                     tmp_path):
    """Each of the image tower's weights, its preprocess and the autocast dtype in effect give
    another cache file; the text tower and the temperature do not."""
    import copy
    import dataclasses

    from torchvision import transforms

    from tulip_pipelines.serving.image_cache import cache_path

    def moved(name):
        model = copy.deepcopy(bundle.model)
        with torch.no_grad():
            dict(model.named_parameters())[name].add_(1e-3)
        return dataclasses.replace(bundle, model=model)

    base = cache_path(tmp_path, bundle, None)
    other = {
        "an image block": cache_path(tmp_path, moved("visual.transformer.resblocks.0.ln_1.bias"),
                                     None),
        "the image projection": cache_path(tmp_path, moved("visual.proj"), None),
        "the preprocess": cache_path(tmp_path, dataclasses.replace(
            bundle, preprocess=transforms.Compose([transforms.Resize(
                32, interpolation=transforms.InterpolationMode.BICUBIC),
                *bundle.preprocess.transforms[1:]])), None),
        "bf16": cache_path(tmp_path, bundle, "bf16"),
        "fp16": cache_path(tmp_path, bundle, "fp16"),
    }
    for what, path in other.items():
        assert path != base, f"the cache file ignores {what}"
    assert len(set(other.values())) == len(other)
    assert cache_path(tmp_path, moved("ln_final.bias"), None) == base  # the text tower
    assert cache_path(tmp_path, moved("logit_scale"), None) == base
    assert base.parent == tmp_path / CACHE_DIR and base.suffix == ".parquet"


def test_on_the_cpu_no_autocast_applies_so_the_cache_is_the_float32_one(bundle, folder):
    folder_embeddings(bundle, folder, autocast="bf16")  # on the CPU: float32 features
    found = folder_embeddings(bundle, folder, autocast=None)
    assert (found.encoded, found.cached) == (0, 3)
    assert len(list((folder / CACHE_DIR).iterdir())) == 1
