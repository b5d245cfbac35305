"""One caption record's checks (no Kedro): the fields it must have, the quarantine reasons of
``rejected_captions``, a kept record as a row of ``captions``, and the id a kept record claims.
The stream that applies them to a whole file is :mod:`.ingest`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from tulip_pipelines.data.images import image_file_exists
from tulip_pipelines.data.paths import check_image_path
from tulip_pipelines.data.tables import MalformedRow


class Reason(str, Enum):
    """Why a record was quarantined (the ``reason`` column of ``rejected_captions``)."""

    NOT_AN_OBJECT = "not_an_object"
    INVALID_ID = "invalid_id"
    MISSING_IMAGE = "missing_image"
    UNSAFE_IMAGE_PATH = "unsafe_image_path"
    MISSING_CONVERSATIONS = "missing_conversations"
    NO_GPT_TURN = "no_gpt_turn"
    EMPTY_CAPTION = "empty_caption"
    IMAGE_NOT_FOUND = "image_not_found"
    UNREADABLE_IMAGE = "unreadable_image"
    DUPLICATE_ID = "duplicate_id"
    MISSING_CAPTION = "missing_caption"  # table / webdataset: no caption value or file
    INVALID_CAPTION = "invalid_caption"  # table / webdataset: a number, a list, ...
    MALFORMED_ROW = "malformed_row"  # CSV/TSV: a row with the wrong number of fields


@dataclass(frozen=True)
class RecordFields:
    """Where a table row or shard record keeps its fields (``ingest.columns``): ``caption`` is
    ``None`` for a ShareGPT4V record (the caption is its first ``gpt`` turn)."""

    image: str = "image"
    caption: str | None = None
    id: str | None = "id"


SHAREGPT4V_FIELDS = RecordFields()


@dataclass(frozen=True)
class Rejection:
    """A quarantined record: its category and a message naming the field."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class CaptionRow:
    """A kept record, as one row of the ``captions`` table."""

    id: str
    image: str
    caption: str
    source: str


def validate_record(
    index: int,
    record: Any,
    image_root: Path,
    check_images: bool,
    seen_ids: dict[str, int] | None,
    fields: RecordFields = SHAREGPT4V_FIELDS,
) -> tuple[CaptionRow | None, Rejection | None]:
    """Validate one record: exactly one of the returned pair is set.

    ``image_root`` must be resolved (absolute, symlinks followed) when ``check_images`` is on.
    ``seen_ids`` maps the ids of kept records to their index; a kept record's id is added to it
    (:func:`claim_id`; ``None`` leaves that to the caller, after more checks). ``fields`` says
    where the record keeps its image, caption and id (a ShareGPT4V record by default; a table
    row by its columns).
    """
    if isinstance(record, MalformedRow):
        return None, Rejection(Reason.MALFORMED_ROW, f"record {index}: {record.describe()}")
    if not isinstance(record, dict):
        return None, Rejection(
            Reason.NOT_AN_OBJECT, f"record {index} is a {type(record).__name__}, not an object"
        )
    image = record.get(fields.image)
    if not isinstance(image, str) or not image.strip():
        return None, Rejection(
            Reason.MISSING_IMAGE,
            f"record {index}: field {fields.image!r} is missing or not a non-empty string",
        )
    relative = check_image_path(image)
    if relative is None:
        return None, Rejection(
            Reason.UNSAFE_IMAGE_PATH,
            f"record {index}: field {fields.image!r} {image!r} is absolute or escapes the image "
            "root",
        )
    raw_id = record.get(fields.id) if fields.id else None
    if raw_id is None or raw_id == "":
        record_id = relative
    elif isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool)):
        record_id = str(raw_id)
    else:
        return None, Rejection(
            Reason.INVALID_ID, f"record {index}: field {fields.id!r} is a {type(raw_id).__name__}"
        )
    if fields.caption is not None:
        caption, rejection = _column_caption(index, record.get(fields.caption), fields.caption)
        if rejection is not None:
            return None, rejection
        return _checked_row(index, image, relative, record_id, caption, image_root, check_images,
                            seen_ids, fields)
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        return None, Rejection(
            Reason.MISSING_CONVERSATIONS,
            f"record {index}: field 'conversations' is missing or not a list",
        )
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            break
    else:
        return None, Rejection(
            Reason.NO_GPT_TURN, f"record {index}: field 'conversations' has no 'gpt' turn"
        )
    caption = turn.get("value")
    if not isinstance(caption, str) or not caption.strip():
        return None, Rejection(
            Reason.EMPTY_CAPTION,
            f"record {index}: field 'conversations[from=gpt].value' is empty or not a string",
        )
    return _checked_row(index, image, relative, record_id, caption, image_root, check_images,
                        seen_ids, fields)


def _column_caption(index: int, value: Any, column: str) -> tuple[str, Rejection | None]:
    """A table's or shard's caption value, or why it is not a caption."""
    if value is None:
        return "", Rejection(Reason.MISSING_CAPTION,
                             f"record {index}: field {column!r} is missing (null)")
    if not isinstance(value, str):
        what = f"a {type(value).__name__} ({value!r:.60})"
        return "", Rejection(Reason.INVALID_CAPTION,
                             f"record {index}: field {column!r} is {what}, not text")
    if not value.strip():
        return "", Rejection(Reason.EMPTY_CAPTION, f"record {index}: field {column!r} is empty")
    if _is_number(value):
        return "", Rejection(Reason.INVALID_CAPTION,
                             f"record {index}: field {column!r} holds only a number "
                             f"({value.strip()[:40]!r}): a column of numbers, not captions?")
    return value, None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _checked_row(index: int, image: str, relative: str, record_id: str, caption: str,
                 image_root: Path, check_images: bool, seen_ids: dict[str, int] | None,
                 fields: RecordFields) -> tuple[CaptionRow | None, Rejection | None]:
    """The checks after the caption: the image file, then the id's claim."""
    if check_images:
        candidate = (image_root / relative).resolve()
        if not candidate.is_relative_to(image_root):
            return None, Rejection(
                Reason.UNSAFE_IMAGE_PATH,
                f"record {index}: field {fields.image!r} {image!r} resolves outside the image "
                f"root (symlink to {candidate})",
            )
        if not image_file_exists(candidate):  # a file, or a member of a tar under the root
            return None, Rejection(
                Reason.IMAGE_NOT_FOUND,
                f"record {index}: field {fields.image!r} file {candidate} not found"
            )
    row = CaptionRow(record_id, relative, caption.strip(), relative.split("/", 1)[0])
    if seen_ids is not None:
        rejection = claim_id(index, row, seen_ids)
        if rejection is not None:
            return None, rejection
    return row, None


def claim_id(index: int, row: CaptionRow, seen_ids: dict[str, int]) -> Rejection | None:
    """Record ``row``'s id as kept, or the rejection of a duplicate of a kept record."""
    first = seen_ids.get(row.id)
    if first is not None:
        return Rejection(
            Reason.DUPLICATE_ID,
            f"record {index}: field 'id' {row.id!r} duplicates kept record {first}",
        )
    seen_ids[row.id] = index
    return None


def decode_error(path: str) -> str | None:
    """Why the image at ``path`` cannot be decoded, or ``None``. JPEGs are decoded in draft mode
    (every coefficient is still read: a truncated or corrupt file fails)."""
    from tulip_pipelines.data.images import open_image_file

    try:
        open_image_file(path, 64)
        return None
    except Exception as err:  # noqa: BLE001 - any decoder failure quarantines the record
        return f"{type(err).__name__}: {err}"


