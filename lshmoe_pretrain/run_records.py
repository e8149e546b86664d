"""What the tracked records of training runs keep of a run's metrics.jsonl (docs/records/*.tar.xz, written by
scripts/land_device_results.py for the GPU testbeds and scripts/archive_cpu_records.py for the CPU proxies).

Every tracked file travels with each GPU call, whose carry limit is 64 MiB, so the records are written small: the
per-step wall-clock fields to 6 significant digits (a microsecond of a 0.1 s step, 10 ms of an hour-long run).
Their last ten digits are timer noise that xz cannot compress, and they were a third of a record. `tokens_per_s` is
left out: it is the run's tokens per step (run.json `tokens_per_step`) over `step_time_s`, no report reads it, and
its noisy digits were a tenth of what was left (2026-12-06, eighth session; the live metrics.jsonl keeps it).
Losses, learning rates and telemetry stay exact.
"""
from __future__ import annotations

import json

WALL_CLOCK_FIELDS = ("step_time_s", "elapsed_s")
WALL_CLOCK_DIGITS = 6
DERIVED_FIELDS = ("tokens_per_s",)  # recomputed from the run's tokens_per_step and step_time_s where wanted


def round_wall_clock(line: str) -> str:
    """One metrics.jsonl line with its wall-clock fields to WALL_CLOCK_DIGITS significant digits and its derived
    fields left out; every other field, and the order of the keys, as they were. Idempotent."""
    record = {key: value for key, value in json.loads(line).items() if key not in DERIVED_FIELDS}
    for key in WALL_CLOCK_FIELDS:
        if isinstance(record.get(key), float):
            record[key] = float(f"{record[key]:.{WALL_CLOCK_DIGITS}g}")
    return json.dumps(record)


def round_metrics(data: bytes) -> bytes:
    """A whole metrics.jsonl, each line through `round_wall_clock`; blank lines dropped."""
    return "".join(round_wall_clock(line) + "\n" for line in data.decode().splitlines() if line.strip()).encode()
