"""The embedded demo: a procedurally drawn long-caption dataset in ShareGPT4V's own format.

Each image is a 3x3 grid of cells on a coloured background; each cell holds a shape with a colour,
a size and a texture. The long caption describes the whole image in reading order: a summary
sentence (the short caption), then one sentence per cell, about 130 CLIP tokens in all.

Images come in *groups* that share the background and the first ``shared_cells`` cells and differ
only in the later ones. ``shared_cells`` is checked against open_clip's tokenizer: every sentence
that starts within the first 75 text tokens (what a 77-token text tower reads between its start
and end tokens) describes a shared cell. A 77-token reader can therefore find an image's group but
not the image; a 248-token reader can find the image. This is a property of the data, verified
when it is generated (:func:`check_group_prefixes`).

The teacher of the embedded default must still *see* every cell, as a web-trained CLIP's image
tower does, although its text tower reads 77 tokens: the generator also emits each caption with
its cell sentences in shuffled order (the summary stays first), which the teacher trains on.

Held-out benchmarks are drawn from their own random streams and never enter the annotation file:
a long-caption one in Urban1k's layout and a short-caption one in Flickr30k's layout. A class
folder for zero-shot classification (:func:`generate_demo_classes`) is drawn apart, from a stream
of its own: the draws of the dataset and benchmarks above are the same with or without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from tulip_pipelines.params import Params, Problems

logger = logging.getLogger(__name__)

POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "centre", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "beige": (222, 205, 160),
    "teal": (50, 130, 130),
    "brown": (110, 75, 45),
}
SIZES = ("small", "large")
TEXTURES = ("solid", "striped")
HUMAN_PROMPT = "<image>\nWhat is in this image? Describe it in detail."
GRID = 3
# What a 77-token CLIP text tower reads of a caption: 77 minus the start and end tokens.
TEACHER_TEXT_TOKENS = 75

Cell = tuple[int, int, int, int]  # indices into SHAPES, COLOURS, SIZES, TEXTURES


@dataclass(frozen=True)
class DemoDataParams(Params):
    """Sizes of the demo (``params:demo_data``)."""

    section = "demo_data"

    seed: int = 0
    image_size: int = 48
    n_groups: int = 750
    group_size: int = 4
    shared_cells: int = 5
    min_differing_cells: int = 2
    shuffled_variants: int = 8
    n_benchmark_groups: int = 50
    n_short_benchmark_images: int = 200
    n_class_images: int = 10

    def __post_init__(self) -> None:
        cells = GRID * GRID
        minimum = {"seed": 0, "image_size": GRID, "n_groups": 1, "group_size": 2,
                   "shared_cells": 1, "min_differing_cells": 1, "shuffled_variants": 1,
                   "n_benchmark_groups": 0, "n_short_benchmark_images": 0,
                   "n_class_images": 0}  # fmt: skip
        p = Problems(self.section)
        for name, low in minimum.items():
            p.int_at_least(name, getattr(self, name), low)
        p.raise_if_any()
        if self.image_size % GRID:
            raise ValueError(
                f"demo_data.image_size must be a multiple of {GRID}, got {self.image_size}"
            )
        if self.shared_cells >= cells:
            raise ValueError(f"demo_data.shared_cells must be < {cells}, got {self.shared_cells}")
        if self.min_differing_cells > cells - self.shared_cells:
            raise ValueError(
                f"demo_data.min_differing_cells must be at most {cells - self.shared_cells} (the "
                f"cells after the {self.shared_cells} shared ones), got {self.min_differing_cells}"
            )


@dataclass
class DemoImage:
    name: str
    group: int
    background: int
    cells: tuple[Cell, ...]

    @property
    def caption(self) -> str:
        return caption_for(self.background, self.cells)

    @property
    def short_caption(self) -> str:
        return summary_sentence(self.background, self.cells[0])


@dataclass
class DemoData:
    """Everything the generator makes, as plain Python objects (the Kedro node saves them)."""

    records: list[dict[str, Any]]
    images: dict[str, Image.Image]
    shuffled_captions: pd.DataFrame
    manifest: pd.DataFrame
    long_benchmark_images: dict[str, Image.Image]
    long_benchmark_captions: dict[str, str]
    short_benchmark_images: dict[str, Image.Image]
    short_benchmark_results_csv: str


def summary_sentence(background: int, first: Cell) -> str:
    shape, colour, size, _ = first
    return (
        f"A three by three grid of shapes on a {list(BACKGROUNDS)[background]} background, with a "
        f"{SIZES[size]} {list(COLOURS)[colour]} {SHAPES[shape]} in the top left corner."
    )


def cell_sentence(position: int, cell: Cell) -> str:
    shape, colour, size, texture = cell
    fill = "stripes" if TEXTURES[texture] == "striped" else "a solid fill"
    return (
        f"The {POSITIONS[position]} cell holds a {SIZES[size]} {list(COLOURS)[colour]} "
        f"{SHAPES[shape]} with {fill}."
    )


def caption_sentences(background: int, cells: tuple[Cell, ...]) -> list[str]:
    return [summary_sentence(background, cells[0])] + [
        cell_sentence(i, cell) for i, cell in enumerate(cells)
    ]


def caption_for(background: int, cells: tuple[Cell, ...]) -> str:
    return " ".join(caption_sentences(background, cells))


def shuffle_sentences(sentences: list[str], rng: np.random.Generator) -> str:
    """The summary stays first; the cell sentences follow in a random order."""
    order = rng.permutation(len(sentences) - 1) + 1
    return " ".join([sentences[0]] + [sentences[i] for i in order])


def draw_image(background: int, cells: tuple[Cell, ...], image_size: int) -> Image.Image:
    """Draw the grid: one shape per cell, on the group's background colour."""
    bg = BACKGROUNDS[list(BACKGROUNDS)[background]]
    image = Image.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(image)
    cell_px = image_size // GRID
    for position, (shape, colour, size, texture) in enumerate(cells):
        row, col = divmod(position, GRID)
        cx, cy = col * cell_px + cell_px / 2, row * cell_px + cell_px / 2
        half = cell_px * (0.45 if SIZES[size] == "large" else 0.3)
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = COLOURS[list(COLOURS)[colour]]
        mask = Image.new("L", image.size, 0)
        mdraw = ImageDraw.Draw(mask)
        if SHAPES[shape] == "circle":
            mdraw.ellipse(box, fill=255)
        elif SHAPES[shape] == "square":
            mdraw.rectangle(box, fill=255)
        elif SHAPES[shape] == "triangle":
            mdraw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
        else:  # cross
            bar = max(1.0, half / 2.5)
            mdraw.rectangle((box[0], cy - bar, box[2], cy + bar - 1), fill=255)
            mdraw.rectangle((cx - bar, box[1], cx + bar - 1, box[3]), fill=255)
        if TEXTURES[texture] == "striped":
            # Keep every other pair of rows: horizontal stripes of the shape's colour.
            top = row * cell_px
            for y in range(top, top + cell_px):
                if (y - top) % 4 >= 2:
                    mdraw.line((col * cell_px, y, (col + 1) * cell_px - 1, y), fill=0)
        draw.bitmap((0, 0), mask, fill=fill)
    return image


def _random_cell(rng: np.random.Generator) -> Cell:
    return (
        int(rng.integers(len(SHAPES))),
        int(rng.integers(len(COLOURS))),
        int(rng.integers(len(SIZES))),
        int(rng.integers(len(TEXTURES))),
    )


def _draw_group(
    rng: np.random.Generator, params: DemoDataParams, size: int, taken: set
) -> list[tuple[int, tuple[Cell, ...]]]:
    """Cells of ``size`` images that share the background and the first cells.

    Every pair differs in at least ``min_differing_cells`` of the later cells, and no image repeats
    one in ``taken`` (images of other splits), which is updated.
    """
    n_cells = GRID * GRID
    for _ in range(1000):
        background = int(rng.integers(len(BACKGROUNDS)))
        shared = tuple(_random_cell(rng) for _ in range(params.shared_cells))
        members: list[tuple[Cell, ...]] = []
        attempts = 0
        while len(members) < size and attempts < 200:
            attempts += 1
            cells = shared + tuple(_random_cell(rng) for _ in range(n_cells - params.shared_cells))
            if (background, cells) in taken:
                continue
            if all(
                sum(a != b for a, b in zip(cells[params.shared_cells :], m[params.shared_cells :]))
                >= params.min_differing_cells
                for m in members
            ):
                members.append(cells)
        if len(members) == size:
            taken.update((background, m) for m in members)
            return [(background, m) for m in members]
    raise RuntimeError("could not draw a group of distinct images; lower demo_data.group_size")


def check_group_prefixes(images: list[DemoImage], params: DemoDataParams) -> dict[str, float]:
    """Verify the demo's defining property with open_clip's tokenizer; return token statistics.

    Raises ``ValueError`` if a sentence that describes a varying cell starts within the first
    ``TEACHER_TEXT_TOKENS`` tokens of any caption (then a 77-token reader could tell group
    members apart), naming the image.

    open_clip's BPE works word by word, so a caption's tokens are its sentences' tokens in order;
    token counts are therefore taken per distinct sentence (a few thousand at most) and summed,
    which is checked against a whole-caption encoding.
    """
    if not images:
        return {}
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    counts: dict[str, int] = {}

    def n_tokens(sentence: str) -> int:
        if sentence not in counts:
            counts[sentence] = len(tokenizer.encode(sentence))
        return counts[sentence]

    first = caption_sentences(images[0].background, images[0].cells)
    if sum(map(n_tokens, first)) != len(tokenizer.encode(" ".join(first))):
        raise RuntimeError("open_clip's tokenizer is not additive over sentences: cannot check")
    lengths = []
    for image in images:
        per_sentence = [n_tokens(s) for s in caption_sentences(image.background, image.cells)]
        shared_len = sum(per_sentence[: 1 + params.shared_cells])
        if shared_len < TEACHER_TEXT_TOKENS:
            raise ValueError(
                f"demo image {image.name}: the summary and the {params.shared_cells} shared cells "
                f"take only {shared_len} tokens, so a 77-token text tower also reads a varying "
                "cell; raise demo_data.shared_cells"
            )
        lengths.append(sum(per_sentence))
    return {
        "min_tokens": float(min(lengths)),
        "mean_tokens": float(np.mean(lengths)),
        "max_tokens": float(max(lengths)),
    }


def _make_images(
    rng: np.random.Generator,
    params: DemoDataParams,
    n_groups: int,
    group_size: int,
    prefix: str,
    group_offset: int,
    taken: set,
) -> list[DemoImage]:
    """``n_groups`` groups of distinct images, named ``<prefix><running number>``."""
    out = []
    for g in range(n_groups):
        for background, cells in _draw_group(rng, params, group_size, taken):
            name = f"{prefix}{len(out) + 1:06d}"
            out.append(DemoImage(name, group_offset + g, background, cells))
    return out


def generate_demo_data(params: DemoDataParams) -> DemoData:
    """Draw the training set and the two held-out benchmarks, deterministically from the seed."""
    train_rng, long_rng, short_rng, shuffle_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(params.seed).spawn(4)
    )
    taken: set = set()
    train = _make_images(train_rng, params, params.n_groups, params.group_size, "", 0, taken)
    long_bench = _make_images(
        long_rng, params, params.n_benchmark_groups, params.group_size, "demo_long_",
        params.n_groups, taken,
    )
    short_bench = _make_images(
        short_rng, params, params.n_short_benchmark_images, 1, "demo_short_",
        params.n_groups + params.n_benchmark_groups, taken,
    )  # fmt: skip
    stats = check_group_prefixes(train + long_bench, params)
    logger.info(
        "demo data: %d training images in %d groups of %d, %d long-caption and %d short-caption "
        "benchmark images; caption tokens min %.0f mean %.1f max %.0f",
        len(train), params.n_groups, params.group_size, len(long_bench), len(short_bench),
        stats.get("min_tokens", 0), stats.get("mean_tokens", 0), stats.get("max_tokens", 0),
    )  # fmt: skip

    records, images, shuffled, manifest = [], {}, [], []
    for item in train:
        path = f"demo/{item.name}"
        records.append(
            {
                "id": f"demo_{item.name}",
                "image": f"{path}.png",
                "conversations": [
                    {"from": "human", "value": HUMAN_PROMPT},
                    {"from": "gpt", "value": item.caption},
                ],
            }
        )
        images[path] = draw_image(item.background, item.cells, params.image_size)
        sentences = caption_sentences(item.background, item.cells)
        for variant in range(params.shuffled_variants):
            caption = shuffle_sentences(sentences, shuffle_rng)
            shuffled.append((f"demo_{item.name}", variant, caption))
    splits = {"train": train, "long_benchmark": long_bench, "short_benchmark": short_bench}
    for split, items in splits.items():
        manifest += [(i.name, split, i.group, list(BACKGROUNDS)[i.background]) for i in items]

    long_images = {i.name: draw_image(i.background, i.cells, params.image_size) for i in long_bench}
    long_captions = {i.name: i.caption + "\n" for i in long_bench}
    short_images = {i.name: draw_image(i.background, i.cells, params.image_size)
                    for i in short_bench}
    rows = [f"{i.name}.jpg| 0| {i.short_caption}" for i in short_bench]
    results_csv = "\n".join(["image_name| comment_number| comment", *rows]) + "\n"
    return DemoData(
        records=records,
        images=images,
        shuffled_captions=pd.DataFrame(shuffled, columns=["id", "variant", "caption"]),
        manifest=pd.DataFrame(manifest, columns=["name", "split", "group", "background"]),
        long_benchmark_images=long_images,
        long_benchmark_captions=long_captions,
        short_benchmark_images=short_images,
        short_benchmark_results_csv=results_csv,
    )


# The class folder's random stream: a child of the seed that generate_demo_data never spawns
# (it spawns children 0-3), so adding the folder changes none of the dataset's draws.
_CLASS_STREAM = 4


def class_name(colour: str) -> str:
    """The class name of the folder ``colour`` (what the prompt templates are filled with)."""
    return f"grid of {colour} shapes"


def generate_demo_classes(params: DemoDataParams) -> tuple[dict[str, Image.Image], dict[str, str]]:
    """A zero-shot classification folder: ``n_class_images`` images per colour of
    :data:`COLOURS`, every cell of an image that colour (random shapes, sizes, textures and
    background); returns ``({"<colour>/<name>": image}, {colour: class name})``."""
    rng = np.random.default_rng(np.random.SeedSequence(params.seed).spawn(_CLASS_STREAM + 1)[-1])
    images = {}
    for colour_index, colour in enumerate(COLOURS):
        for i in range(params.n_class_images):
            background = int(rng.integers(len(BACKGROUNDS)))
            cells = tuple((int(rng.integers(len(SHAPES))), colour_index,
                           int(rng.integers(len(SIZES))), int(rng.integers(len(TEXTURES))))
                          for _ in range(GRID * GRID))
            images[f"{colour}/demo_class_{colour}_{i:04d}"] = draw_image(background, cells,
                                                                         params.image_size)
    classes = {colour: class_name(colour) for colour in COLOURS} if images else {}
    logger.info("demo class folder: %d images in %d classes", len(images), len(classes))
    return images, classes
