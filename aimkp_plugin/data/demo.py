"""The demo dataset: the bundled real CMKP records (``tw_mm_s1_tiny``) with generated images.

The tweet images are not distributable, so each record gets a deterministic procedural picture, saved under the
file name its raw line points at. Its colours and shapes derive from the first gold keyphrase, so the image carries
part of the answer and a tiny model has something to learn from either modality.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .cmkp import BUNDLED_DIR, CmkpPost, iter_records


DEMO_SPLITS = ("train", "valid", "test")
IMAGE_SIZE = (64, 64)
IMAGE_DIR = "images"


def draw_post_image(post: CmkpPost, size: tuple[int, int] = IMAGE_SIZE):
    """A picture whose background, shape and stripes are functions of the post's first keyphrase."""
    from PIL import Image, ImageDraw

    digest = hashlib.sha256(post.keyphrases[0].encode("utf-8")).digest()
    width, height = size
    image = Image.new("RGB", size, tuple(digest[0:3]))
    draw = ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    colour = tuple(digest[3:6])
    (draw.ellipse if digest[6] % 2 else draw.rectangle)(box, fill=colour)
    for stripe in range(digest[7] % 4):
        y = (stripe + 1) * height // 5
        draw.line((0, y, width, y), fill=tuple(digest[8:11]), width=2)
    return image


def write_post_images(posts: list[CmkpPost], image_dir: Path, size: tuple[int, int] = IMAGE_SIZE) -> int:
    """Write one ``size`` image per post (format from the file name), keeping existing ones; returns how many were
    new."""
    image_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for post in posts:
        target = image_dir / post.image
        if target.exists():
            continue
        draw_post_image(post, size).save(target, quality=95)  # PNG ignores quality
        written += 1
    return written


def demo_dataset_info(prefix: str = "") -> dict:
    """``dataset_info.json`` entries for the demo splits, with file names under ``prefix``."""
    return {
        f"cmkp_demo_{split}": {
            "file_name": f"{prefix}{split}_src.txt",
            "formatting": "cmkp",
            "cmkp": {"media_dir": f"{prefix}{IMAGE_DIR}"},
        }
        for split in DEMO_SPLITS
    }


def build_demo_dataset(out: str | os.PathLike[str]) -> Path:
    """Copy the bundled raw splits to ``out`` and generate their images under ``out/images``.

    Also writes ``out/dataset_info.json`` so ``dataset_dir: out`` works on its own. Idempotent.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in DEMO_SPLITS:
        source = BUNDLED_DIR / f"{split}_src.txt"
        shutil.copyfile(source, out / source.name)
        posts = [item for _, item in iter_records(source) if isinstance(item, CmkpPost)]
        write_post_images(posts, out / IMAGE_DIR)
    (out / "dataset_info.json").write_text(json.dumps(demo_dataset_info(), indent=2) + "\n")
    return out
