"""What the ``.pth`` activation costs at interpreter start, and what the patches cost inside a LLaMA-Factory import.

    python benchmarks/startup_cost.py [--runs 30]

Uses ``python -X importtime``: the self time of every ``aimkp_plugin`` module imported at start (the bootstrap),
against the whole start-up of ``python -c "import json"`` measured in the same run, and the plugin's share of
``import llamafactory.train.tuner``. Prints JSON; times are medians over ``--runs`` fresh interpreters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def import_times(code: str) -> dict[str, tuple[int, int]]:
    """``{module: (self_us, cumulative_us)}`` from ``-X importtime`` for one fresh interpreter running ``code``."""
    command = [sys.executable, "-X", "importtime", "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    times = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = (part.strip() for part in line[len("import time:") :].split("|"))
        times[name.strip()] = (int(self_us), int(cumulative_us))
    return times


def plugin_self_us(times: dict[str, tuple[int, int]]) -> int:
    return sum(self_us for name, (self_us, _) in times.items() if name.startswith("aimkp_plugin"))


def wall_ms(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    runs = parser.parse_args().runs

    start_plugin_us, start_total_us, start_wall_ms = [], [], []
    for _ in range(runs):
        times = import_times("import json")
        start_plugin_us.append(plugin_self_us(times))
        start_total_us.append(sum(self_us for self_us, _ in times.values()))
        start_wall_ms.append(wall_ms("import json"))

    tuner_plugin_us, tuner_total_us = [], []
    for _ in range(max(3, runs // 10)):
        times = import_times("import llamafactory.train.tuner")
        tuner_plugin_us.append(plugin_self_us(times))
        tuner_total_us.append(times["llamafactory.train.tuner"][1])

    print(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "runs": runs,
                "start_plugin_import_ms": statistics.median(start_plugin_us) / 1000,
                "start_all_imports_ms": statistics.median(start_total_us) / 1000,
                "start_wall_ms_python_c_import_json": round(statistics.median(start_wall_ms), 2),
                "start_plugin_share_of_wall": round(
                    statistics.median(start_plugin_us) / 1000 / statistics.median(start_wall_ms), 4
                ),
                "llamafactory_tuner_import_ms": statistics.median(tuner_total_us) / 1000,
                "plugin_modules_during_tuner_import_ms": statistics.median(tuner_plugin_us) / 1000,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
