"""A deterministic generator of synthetic multimodal keyphrase posts, in the CMKP raw format.

Design (fixed before any result was looked at):

- ``classes`` topics. Each topic has a keyphrase (two pseudo-words), a text cue word, and an image signature
  (a background colour and a shape).
- A post's text is 8–14 filler words from a ``filler_vocab``-word pseudo vocabulary. If the post signals its topic in
  the text, the topic's cue word is inserted at a random position.
- A post's image is 56×56. If the post signals its topic in the image, it shows the topic's colour and shape.
  Otherwise it shows a grey background with random dots, which carry no topic.
- Training posts: a ``redundant`` fraction signal the topic in both modalities (the shortcut the paper targets). The
  rest are split evenly between text-only and image-only signals.
- Test posts always signal in both modalities. The full / text-only / image-only settings then ask the model to use
  both, only the text, or only the image.
- The gold is the topic's keyphrase (one per post).

    python benchmarks/robustness/generate.py --out DIR [--seed 0] [--train 600] [--test 120] [--redundant 0.8]
        [--classes 8] [--filler-vocab 200]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path


SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vu", "zor", "pel", "qui", "dan", "fey", "gor", "hu", "jin", "nax", "sol")
COLOURS = (
    (220, 40, 40),
    (40, 160, 60),
    (40, 80, 220),
    (230, 200, 30),
    (160, 50, 200),
    (30, 200, 210),
    (240, 130, 20),
    (120, 70, 30),
)
SHAPES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 56


@dataclass(frozen=True)
class Topic:
    keyphrase: str
    cue: str
    colour: tuple[int, int, int]
    shape: str


def pseudo_word(generator: random.Random, syllables: int) -> str:
    return "".join(generator.choice(SYLLABLES) for _ in range(syllables))


def make_topics(generator: random.Random, count: int) -> list[Topic]:
    if count > len(COLOURS) * len(SHAPES):
        raise ValueError(f"at most {len(COLOURS) * len(SHAPES)} classes")
    words: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = pseudo_word(generator, syllables)
            if word not in words:
                words.add(word)
                return word

    signatures = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    return [Topic(f"{fresh(2)} {fresh(2)}", fresh(3), *signatures[index % len(signatures)]) for index in range(count)]


def draw(topic: Topic | None, generator: random.Random):
    from PIL import Image, ImageDraw

    size = IMAGE_SIZE
    if topic is None:  # no topic in the image: grey with random dots
        image = Image.new("RGB", (size, size), (128, 128, 128))
        canvas = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = generator.randrange(size), generator.randrange(size)
            shade = generator.randrange(90, 170)
            canvas.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(shade, shade, shade))
        return image
    image = Image.new("RGB", (size, size), topic.colour)
    canvas = ImageDraw.Draw(image)
    low, high = size // 4 + generator.randrange(-3, 4), 3 * size // 4 + generator.randrange(-3, 4)
    ink = (255, 255, 255)
    if topic.shape == "circle":
        canvas.ellipse((low, low, high, high), fill=ink)
    elif topic.shape == "square":
        canvas.rectangle((low, low, high, high), fill=ink)
    elif topic.shape == "triangle":
        canvas.polygon([(low, high), (high, high), ((low + high) // 2, low)], fill=ink)
    else:
        middle = (low + high) // 2
        canvas.rectangle((middle - 4, low, middle + 4, high), fill=ink)
        canvas.rectangle((low, middle - 4, high, middle + 4), fill=ink)
    return image


def post_text(generator: random.Random, fillers: list[str], cue: str | None) -> str:
    words = [generator.choice(fillers) for _ in range(generator.randint(8, 14))]
    if cue is not None:
        words.insert(generator.randrange(len(words) + 1), cue)
    return " ".join(words)


def generate(
    out: Path, seed: int, train: int, test: int, redundant: float, classes: int, filler_vocab: int
) -> dict[str, int]:
    """Write ``train_src.txt``, ``test_src.txt``, ``images/`` and ``dataset_info.json`` under ``out``."""
    generator = random.Random(seed)
    topics = make_topics(generator, classes)
    cues = {topic.cue for topic in topics}
    fillers: list[str] = []
    while len(fillers) < filler_vocab:
        word = pseudo_word(generator, 2)
        if word not in cues and word not in fillers:
            fillers.append(word)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"both": 0, "text": 0, "image": 0}
    for split, size in (("train", train), ("test", test)):
        lines = []
        for index in range(size):
            topic = topics[generator.randrange(classes)]
            if split == "test" or generator.random() < redundant:
                signal = "both"
            else:
                signal = generator.choice(("text", "image"))
            if split == "train":
                counts[signal] += 1
            name = f"{split}_{index:05d}.png"
            draw(topic if signal in ("both", "image") else None, generator).save(out / "images" / name)
            text = post_text(generator, fillers, topic.cue if signal in ("both", "text") else None)
            lines.append(f"{text}<sep>{topic.keyphrase}<sep>https://synthetic/{name}")
        (out / f"{split}_src.txt").write_text("\n".join(lines) + "\n")
    info = {
        f"robust_{split}": {"file_name": f"{split}_src.txt", "formatting": "cmkp", "cmkp": {"media_dir": "images"}}
        for split in ("train", "test")
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Synthetic multimodal keyphrase posts (CMKP raw format).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--redundant", type=float, default=0.8, help="Fraction of training posts signalling twice.")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--filler-vocab", type=int, default=200)
    options = parser.parse_args()
    counts = generate(
        Path(options.out),
        options.seed,
        options.train,
        options.test,
        options.redundant,
        options.classes,
        options.filler_vocab,
    )
    print(json.dumps({"out": options.out, "train_signals": counts}))


if __name__ == "__main__":
    main()
