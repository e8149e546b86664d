"""What the tracked records of training runs keep of a run's metrics.jsonl (docs/records/*.tar.xz, written by
scripts/land_device_results.py for the GPU testbeds and scripts/archive_cpu_records.py for the CPU proxies).

Every tracked file travels with each GPU call, whose carry limit is 64 MiB, so the records are written small: the
per-step wall-clock fields to 6 significant digits (a microsecond of a 0.1 s step, 10 ms of an hour-long run).
Their last ten digits are timer noise that xz cannot compress, and they were a third of a record. `tokens_per_s` is
left out: it is the run's tokens per step (run.json `tokens_per_step`) over `step_time_s`, no report reads it, and
its noisy digits were a tenth of what was left (2026-12-06, eighth session; the live metrics.jsonl keeps it).

The learning rate, the auxiliary (load-balancing) loss and the plugin's and the probe's telemetry (`lsh_moe/...`,
`probe/...`) go to 6 significant digits too, where a value is not a whole number (bytes counts stay exact): no
report shows more than 4 digits of them, and a mean over thousands of steps moves by less than 1e-6 of itself. They
were a sixth of the GPU record (2026-12-07, twelfth session, when 14 runs took the carry over its limit). The losses
a report compares stay exact: `loss`, `valid_loss`, `valid_loss_compressed` (the rate 1.0 control equals stock's
validation loss to the last digit, and the records show it).

`elapsed_s` and `lr` stay only on the evaluation lines and the last line (2026-12-07, fifteenth session, with the
carry at 62 of its 64 MiB): no report reads either. Between evaluations the wall clock is the running sum of
`step_time_s` (scripts/plot_runs.py fills it so), and the learning rate is the schedule's, which the evaluation
lines still show (a 2x variant's rate is checked there). They were 23% of the compressed GPU record.
"""
from __future__ import annotations

import json

WALL_CLOCK_FIELDS = ("step_time_s", "elapsed_s")
DIGITS = 6
DERIVED_FIELDS = ("tokens_per_s",)  # recomputed from the run's tokens_per_step and step_time_s where wanted
ROUNDED_FIELDS = WALL_CLOCK_FIELDS + ("lr", "aux_loss")
ROUNDED_PREFIXES = ("lsh_moe/", "probe/")   # telemetry: rounded where not a whole number
EXACT_FIELDS = ("loss", "valid_loss", "valid_loss_compressed")
SPARSE_FIELDS = ("elapsed_s", "lr")   # kept on the evaluation lines and the last line only


def _rounded(key: str, value):
    if not isinstance(value, float) or key in EXACT_FIELDS:
        return value
    if key in ROUNDED_FIELDS or (key.startswith(ROUNDED_PREFIXES) and not value.is_integer()):
        return float(f"{value:.{DIGITS}g}")
    return value


def round_line(line: str) -> str:
    """One metrics.jsonl line with its wall-clock fields, learning rate, auxiliary loss and non-integral telemetry
    to DIGITS significant digits and its derived fields left out; the losses, every other field, and the
    order of the keys, as they were. Idempotent."""
    return json.dumps({key: _rounded(key, value) for key, value in json.loads(line).items()
                       if key not in DERIVED_FIELDS})


def _thinned(line: str) -> str:
    """A line between evaluations without its SPARSE_FIELDS."""
    record = json.loads(line)
    if "valid_loss" in record or not any(key in record for key in SPARSE_FIELDS):
        return line
    return json.dumps({key: value for key, value in record.items() if key not in SPARSE_FIELDS})


def round_metrics(data: bytes) -> bytes:
    """A whole metrics.jsonl, each line through `round_line`, the lines before the last without SPARSE_FIELDS unless
    they hold an evaluation; blank lines dropped. Idempotent."""
    lines = [round_line(line) for line in data.decode().splitlines() if line.strip()]
    return "".join(line + "\n" for line in [*map(_thinned, lines[:-1]), *lines[-1:]]).encode()
