"""Write the records archive of a CPU proxy's runs (docs/records/testbed_<proxy>_pinned_cpu.tar.xz) from this
checkout's runs, keeping what the archive already holds that the checkout lacks (runs and study logs of earlier
sessions: a fresh clone has no runs/ folder).

    python scripts/archive_cpu_records.py gpt-mini-long-cpu
    python scripts/archive_cpu_records.py t5-mini-long-cpu --logs runs/cpu_testbed/t5_lengths_seed2.log

A run contributes its records, not its checkpoints: run.json, ds_config.json, metrics.jsonl and train.log, as
`cpu_testbed/<proxy>/x<length>/<model>/<variant>/seed<n>/...`; a study log named with --logs goes in as
`cpu_testbed/<its name>`. A file the checkout has replaces the archive's copy. xz, since everything tracked travels
with each GPU call (64 MiB in all).
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tarfile
from typing import Dict, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import testbed as beds  # noqa: E402
from lshmoe_pretrain.run_records import round_metrics  # noqa: E402

RECORD_FILES = ("run.json", "ds_config.json", "metrics.jsonl", "train.log")
PREFIX = "cpu_testbed"


def record_path(proxy: str) -> str:
    return os.path.join("docs", "records", f"testbed_{proxy}_pinned_cpu.tar.xz")


def local_files(root: str, proxy: str, logs: Sequence[str]) -> Dict[str, str]:
    """{member name: local path} of every run record under root/<proxy> and every named log."""
    found = {}
    for name in RECORD_FILES:
        for path in glob.glob(os.path.join(root, proxy, "x*", "*", "*", "seed*", name)):
            found[f"{PREFIX}/{os.path.relpath(path, root)}"] = path
    for path in logs:
        if not os.path.isfile(path):
            raise SystemExit(f"--logs {path}: no such file")
        found[f"{PREFIX}/{os.path.basename(path)}"] = path
    return found


def _member_data(name: str, data: bytes) -> bytes:
    """What the archive keeps of a file: a metrics.jsonl with the digits no report reads rounded
    (lshmoe_pretrain.run_records), anything else as it is."""
    return round_metrics(data) if os.path.basename(name) == "metrics.jsonl" else data


def write(record: str, files: Dict[str, str]) -> int:
    """The archive at `record`: its members, each replaced by the local file of that name where there is one, and
    the local files it lacks; metrics.jsonl's unread digits rounded (`_member_data`), xz preset 9. Written
    beside and moved, so that a failure leaves the old one. Members written."""
    kept: Dict[str, Tuple[tarfile.TarInfo, bytes]] = {}
    if os.path.exists(record):
        with tarfile.open(record) as old:
            for member in old.getmembers():
                if member.isfile() and member.name not in files:
                    kept[member.name] = (member, old.extractfile(member).read())
    with tarfile.open(record + ".part", "w:xz", preset=9) as tar:
        for name in sorted(set(kept) | set(files)):
            if name in files:
                member = tar.gettarinfo(files[name], arcname=name)
                with open(files[name], "rb") as handle:
                    data = handle.read()
            else:
                member, data = kept[name]
            data = _member_data(name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    os.replace(record + ".part", record)
    return len(set(kept) | set(files))


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    proxies = sorted(name for name, bed in beds.TESTBEDS.items() if bed.proxy_of)
    parser.add_argument("proxy", choices=proxies)
    parser.add_argument("--root", default=os.path.join("runs", "cpu_testbed"))
    parser.add_argument("--logs", nargs="*", default=[], help="study logs to add (their file names are kept)")
    parser.add_argument("--record", default=None, help="default docs/records/testbed_<proxy>_pinned_cpu.tar.xz")
    args = parser.parse_args(argv)
    record = args.record or record_path(args.proxy)
    count = write(record, local_files(args.root, args.proxy, args.logs))
    print(f"{record}: {count} files")


if __name__ == "__main__":
    main()
