"""What checking a dataset's images costs: PIL's ``verify()`` (which lets truncated files through) against the full
decode the ``cmkp`` loader runs (JPEGs at 1/8 size with ``draft``), and a full-size decode for comparison.

    python benchmarks/image_check_cost.py [--count 5000] [--large 500]

``--count`` demo pictures (64×64 JPEG, as ``aimkp data demo`` writes them) and ``--large`` 1024×768 JPEGs (the size
of a typical social-media photo) are written to a temporary folder, then each check is timed over all of them in one
process (best of 3). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from aimkp_plugin.data.cmkp import bundled_cmkp_posts, decode_image
from aimkp_plugin.data.demo import draw_post_image


def verify(path: Path) -> None:
    with Image.open(path) as picture:
        picture.verify()


def full_size_decode(path: Path) -> None:
    with Image.open(path) as picture:
        picture.load()


CHECKS: dict[str, Callable[[Path], None]] = {
    "verify": verify,
    "decode_image (the loader's check)": decode_image,
    "full-size decode": full_size_decode,
}


def best_of(check: Callable[[Path], None], paths: list[Path], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            check(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="demo pictures (64×64 JPEG)")
    parser.add_argument("--large", type=int, default=500, help="1024×768 JPEGs")
    options = parser.parse_args()
    posts = bundled_cmkp_posts()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, count, size in (
            ("demo 64x64", options.count, (64, 64)),
            ("photo 1024x768", options.large, (1024, 768)),
        ):
            paths = []
            for number in range(count):
                path = Path(folder) / f"{name.split()[0]}_{number}.jpg"
                draw_post_image(posts[number % len(posts)], size).save(path, quality=90)
                paths.append(path)
            results[name] = {
                "images": count,
                **{check: round(best_of(function, paths), 3) for check, function in CHECKS.items()},
            }
    print(json.dumps({"seconds": results}, indent=2))


if __name__ == "__main__":
    main()
