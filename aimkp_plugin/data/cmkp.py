"""The CMKP dataset format: reading posts, checking them, and turning them into the spec's prompt and answer.

Three input forms are accepted, chosen per file:

- ``*.txt``: CMKP raw files, one post a line: ``text<sep>kp1;kp2<sep>image_url``. The image is the URL's last path
  segment, looked up under the media dir.
- ``*.json`` / ``*.jsonl`` records ``{"text", "image", "keyphrases"}``; ``keyphrases`` is a list, or one string
  separated by ``;`` or ``,``.
- ``*.json`` / ``*.jsonl`` records in the AimKP/LLaVA form ``{"image", "text", "conversations": [human, gpt]}``;
  the gold keyphrases are the gpt turn split on ``,``.

Prompt (user turn): ``<image>`` + post text + ``\\n`` + instruction. Answer: the keyphrases, lower-cased, joined with
``", "``. Nothing here imports LLaMA-Factory or torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


DEFAULT_INSTRUCTION = "What phrases should be used to tag the media?"
IMAGE_PLACEHOLDER = "<image>"
RAW_SEPARATOR = "<sep>"
ANSWER_SEPARATOR = ", "
RAW_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".json", ".jsonl")
SUPPORTED_SUFFIXES = RAW_SUFFIXES + JSON_SUFFIXES
MAX_LISTED_PROBLEMS = 5
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "resources" / "cmkp_tiny"


class CmkpFormatError(ValueError):
    """A CMKP file holds records that cannot be trained on."""


class RecordError(ValueError):
    """One record is unusable; the message says why."""


@dataclass(frozen=True)
class CmkpPost:
    """One post: its text, its gold keyphrases (lower case) and its image as written in the file."""

    text: str
    keyphrases: tuple[str, ...]
    image: str


@dataclass(frozen=True)
class BadRecord:
    """Where a bad record is (``path``, ``"line 12"`` or ``"record 12"``) and what is wrong with it."""

    path: str
    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}, {self.location}: {self.reason}"


@dataclass(frozen=True)
class LoadedPost:
    """A usable post with its resolved image path and a stable identity ``source`` (``file:line``)."""

    post: CmkpPost
    image_path: str
    source: str


@dataclass
class LoadReport:
    posts: list[LoadedPost] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


def split_keyphrases(value: object) -> tuple[str, ...]:
    """Normalise gold keyphrases: a list, or a ``;``- or ``,``-separated string; stripped, lower-cased, no empties."""
    if isinstance(value, str):
        pieces = value.split(";") if ";" in value else value.split(",")
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(piece, str) for piece in value):
            raise RecordError(f"keyphrases must be strings, got {value!r}")
        pieces = list(value)
    elif value is None:
        pieces = []
    else:
        raise RecordError(f"keyphrases must be a list or a string, got {type(value).__name__}")
    return tuple(piece.strip().lower() for piece in pieces if piece.strip())


def _checked_post(text: object, keyphrases: tuple[str, ...], image: object) -> CmkpPost:
    if not isinstance(text, str) or not text.strip():
        raise RecordError("empty post text")
    if not keyphrases:
        raise RecordError("no keyphrases")
    if not isinstance(image, str) or not image.strip():
        raise RecordError("no image")
    return CmkpPost(text=text.strip(), keyphrases=keyphrases, image=image.strip())


def parse_raw_line(line: str) -> CmkpPost:
    """Parse ``text<sep>kp1;kp2<sep>image_url``; the image is the URL's last path segment."""
    fields = line.split(RAW_SEPARATOR)
    if len(fields) != 3:
        raise RecordError(
            f"expected 3 fields separated by {RAW_SEPARATOR!r} (text, keyphrases, image url), got {len(fields)}"
        )
    text, keyphrases, url = fields
    return _checked_post(text, split_keyphrases(keyphrases), url.strip().rstrip("/").rsplit("/", 1)[-1])


def _text_from_human_turn(value: str) -> str:
    """Recover the post text from an AimKP human turn ``<image>TEXT\\nINSTRUCTION``."""
    body = value.replace(IMAGE_PLACEHOLDER, "", 1)
    return body.rsplit("\n", 1)[0] if "\n" in body else body


def parse_json_record(record: object) -> CmkpPost:
    """Parse a ``{text, image, keyphrases}`` record or an AimKP ``{image, text, conversations}`` record."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(turn, dict) for turn in turns[:2]):
            raise RecordError("'conversations' must hold a human turn and a gpt turn")
        human, gpt = turns[0].get("value"), turns[1].get("value")
        text = record.get("text")
        if text is None and isinstance(human, str):
            text = _text_from_human_turn(human)
        keyphrases = split_keyphrases(gpt.split(",") if isinstance(gpt, str) else gpt)
        return _checked_post(text, keyphrases, record.get("image"))
    missing = [key for key in ("text", "keyphrases", "image") if key not in record]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}; a record needs text, keyphrases and image")
    return _checked_post(record["text"], split_keyphrases(record["keyphrases"]), record["image"])


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[str, CmkpPost | RecordError]]:
    """Yield ``(location, post or error)`` for every record of one file; raises only for unreadable files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise CmkpFormatError(f"{path}: unsupported file type {suffix!r}; cmkp reads {', '.join(SUPPORTED_SUFFIXES)}")
    data = path.read_bytes()
    if suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CmkpFormatError(
                f"{path}, line {_line_of_offset(data, err.start)}: undecodable bytes ({err.reason}); "
                "a JSON list cannot be read around them, so re-save the file as UTF-8"
            ) from err
        except json.JSONDecodeError as err:
            raise CmkpFormatError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from err
        for number, record in enumerate(records, start=1):
            try:
                yield f"record {number}", parse_json_record(record)
            except RecordError as err:
                yield f"record {number}", err
        return

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    for number, raw in enumerate(lines, start=1):
        location = f"line {number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            yield location, RecordError(f"undecodable bytes at column {err.start + 1} ({err.reason})")
            continue
        if suffix in RAW_SUFFIXES:
            try:
                yield location, parse_raw_line(line)
            except RecordError as err:
                yield location, err
            continue
        if not line.strip():
            yield location, RecordError("empty line")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield location, RecordError(f"not valid JSON ({err.msg})")
            continue
        try:
            yield location, parse_json_record(record)
        except RecordError as err:
            yield location, err


def resolve_image(image: str, media_dir: str | os.PathLike[str] | None) -> str:
    """Return the readable image file for ``image`` (absolute, or under ``media_dir``); raise ``RecordError``."""
    from PIL import Image

    path = Path(image) if os.path.isabs(image) or media_dir is None else Path(media_dir) / image
    if not path.is_file():
        raise RecordError(f"image {image!r} not found (looked for {path})")
    try:
        decode_image(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RecordError(f"image {path} is unreadable ({err})") from err
    return str(path)


def decode_image(path: str | os.PathLike[str]) -> None:
    """Decode the whole image, as training will: a truncated file passes PIL's ``verify()`` but fails here.

    A JPEG is decoded at 1/8 size (``draft``): the decoder still reads all of its entropy-coded data, so a missing
    end is caught, at a fraction of the cost of a full decode.
    """
    from PIL import Image

    with Image.open(path) as picture:
        if picture.format == "JPEG":
            picture.draft("RGB", (max(1, picture.width // 8), max(1, picture.height // 8)))
        picture.load()


def load_cmkp_files(
    paths: Iterable[str | os.PathLike[str]], media_dir: str | os.PathLike[str] | None, check_images: bool = True
) -> LoadReport:
    """Read every record of ``paths``; usable posts and bad records come back separately, in file order."""
    report = LoadReport()
    for path in paths:
        for location, item in iter_records(path):
            if isinstance(item, RecordError):
                report.bad.append(BadRecord(str(path), location, str(item)))
                continue
            try:
                image_path = resolve_image(item.image, media_dir) if check_images else item.image
            except RecordError as err:
                report.bad.append(BadRecord(str(path), location, str(err)))
                continue
            report.posts.append(LoadedPost(item, image_path, f"{Path(path).name}:{location.split()[-1]}"))
    return report


def describe_bad_records(bad: list[BadRecord], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """The first ``limit`` problems, one a line, and the total."""
    shown = "\n".join(f"  - {record}" for record in bad[:limit])
    more = f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} bad record(s):\n{shown}{more}"


def build_prompt(text: str, instruction: str = DEFAULT_INSTRUCTION, setting: str = "full") -> str:
    """The user turn of the spec: ``<image>`` + post text + newline + instruction.

    ``text_only`` drops the image placeholder; ``image_only`` drops the post text (the instruction stays).
    """
    image = "" if setting == "text_only" else IMAGE_PLACEHOLDER
    post = "" if setting == "image_only" else text
    return f"{image}{post}\n{instruction}"


def build_answer(keyphrases: Iterable[str]) -> str:
    """The assistant turn of the spec: lower-cased keyphrases joined with ``", "``."""
    return ANSWER_SEPARATOR.join(phrase.lower() for phrase in keyphrases)


def bundled_cmkp_posts(split: str = "train") -> list[CmkpPost]:
    """The real CMKP records shipped with the package (``tw_mm_s1_tiny``: train 200 / valid 200 / test 50)."""
    posts = []
    for _, item in iter_records(BUNDLED_DIR / f"{split}_src.txt"):
        if isinstance(item, CmkpPost):
            posts.append(item)
    return posts
