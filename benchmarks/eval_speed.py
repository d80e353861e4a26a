"""How long ``aimkp eval`` takes to score 5,000 predictions (the target is under 2 s), in both styles.

    python benchmarks/eval_speed.py [--count 5000]

Predictions are built from the bundled real CMKP records (gold keyphrases, shuffled and mixed with other posts'
keyphrases), written as a ``generated_predictions.jsonl``, then read and scored in a fresh interpreter, as the
command does. Prints JSON with the wall time of the whole command and of reading + scoring alone.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    count = parser.parse_args().count

    from aimkp_plugin.data.cmkp import bundled_cmkp_posts

    posts = [post for split in ("train", "valid", "test") for post in bundled_cmkp_posts(split)]
    generator = random.Random(0)
    rows = []
    for index in range(count):
        gold = list(posts[index % len(posts)].keyphrases)
        other = list(posts[generator.randrange(len(posts))].keyphrases)
        predicted = generator.sample(gold + other, k=len(gold + other))
        rows.append({"prompt": "", "predict": ", ".join(predicted), "label": ", ".join(gold)})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated_predictions.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        start = time.perf_counter()
        command = [sys.executable, "-m", "aimkp_plugin.cli", "eval", str(path), "--style", "both", "--json"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        command_s = time.perf_counter() - start

        from aimkp_plugin.evaluation.metrics import score
        from aimkp_plugin.evaluation.predictions import read_pairs

        start = time.perf_counter()
        pairs = read_pairs(path, progress=False)
        for style in ("aimkp", "cmkp"):
            score(pairs, style)
        in_process_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "predictions": count,
                "styles": ["aimkp", "cmkp"],
                "command_wall_s": round(command_s, 3),
                "read_and_score_s": round(in_process_s, 3),
                "scores": json.loads(result.stdout),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
