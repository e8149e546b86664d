"""Land what a lent GPU machine's calls brought back (their `files_at` folders) in this checkout, in call order:

    python scripts/land_device_results.py /work/.device/7 /work/.device/8 ...

- `testbed_runs.tgz` (gpu_session.sh's testbed snapshot: the files under `testbed/` that the lease wrote, not the
  runs it started from): each is merged into `--runs` (default runs/testbed_pinned), a later call's file replacing
  an earlier one's; `--runs` starts from `--record` when this checkout has none (a fresh clone). Then `--record`
  (docs/records/testbed_pinned_runs.tar.xz: every testbed run on the pinned corpus, whatever the shape and card) is
  written again from `--runs`, in xz: it is tracked, and everything tracked travels with each GPU call, whose
  carry limit is 64 MiB;
- `captures_step<S>_layer<L>.tar` (one capture file each, members under testbed/): extracted into `--captures`
  (default runs/testbed_captures), never into `--runs`, so that the tracked record stays small (a capture holds
  tokens, gradients and expert weights: up to 10 MB each);
- `benchmarks.md` and `link_model.md` (a copy of docs/'s with the call's sections written in): every section that
  is new there or differs from docs/'s before anything landed is written into docs/ (a call's copy starts from
  the checkout it was sent, so its other sections are the checkout's own and must not undo an earlier call's).

It prints what it did; the reports (compare_quality.py report / lengths / frontier) are the next step.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import benchmarking as bench  # noqa: E402

SECTION = re.compile(r"<!-- BEGIN (\S+) -->")
DOCS = ("benchmarks.md", "link_model.md")


def sections(path: str) -> Dict[str, str]:
    """{name: text} of every section of `path` (none if it does not exist)."""
    if not os.path.exists(path):
        return {}
    return {name: bench.read_section_text(path, name) for name in SECTION.findall(open(path).read())}


def land_sections(source: str, target: str, before: Dict[str, str]) -> List[str]:
    """Write into `target` every section of `source` that differs from `before` (the target's sections before
    anything landed: a call's copy holds the checkout's other sections as they were when it was sent, and those
    must not undo what an earlier call landed); their names."""
    written = []
    for name, text in sections(source).items():
        if text != before.get(name):
            bench.write_section(target, name, text.strip("\n"))
            written.append(name)
    return written


def _members_under_testbed(tar: tarfile.TarFile, archive: str) -> None:
    names = tar.getnames()
    if not names or any(n.split("/")[0] != "testbed" for n in names):
        raise SystemExit(f"{archive}: not a testbed snapshot (every member under testbed/)")


def extract_into(archive: str, runs: str) -> None:
    """The files of `archive` (members under testbed/) into `runs`, over what is there."""
    with tarfile.open(archive) as tar:   # gzip or xz, told by the file
        _members_under_testbed(tar, archive)
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, filter="data")
            shutil.copytree(os.path.join(tmp, "testbed"), runs, dirs_exist_ok=True)


def _without_captures(member: tarfile.TarInfo):
    """A run's captures/ folder stays out of the tracked record, however it got into the runs."""
    return None if "captures" in member.name.split("/") else member


def write_record(runs: str, record: str) -> None:
    """`runs` as the archive docs/ keeps: members under testbed/ (no captures), xz (a third smaller than gzip on
    these records), written beside and then moved, so that a failure leaves the old record."""
    os.makedirs(os.path.dirname(record) or ".", exist_ok=True)
    with tarfile.open(record + ".part", "w:xz", preset=6) as tar:
        tar.add(runs, arcname="testbed", filter=_without_captures)
    os.replace(record + ".part", record)


def land_testbed(archives: Sequence[str], runs: str, record: str) -> None:
    """Merge each call's snapshot, in order, into `runs` (started from `record` where `runs` does not exist), then
    write `record` from `runs`."""
    for archive in archives:   # every snapshot is checked before anything is written
        with tarfile.open(archive) as tar:
            _members_under_testbed(tar, archive)
    if not os.path.exists(runs) and os.path.exists(record):
        extract_into(record, runs)
    for archive in archives:
        extract_into(archive, runs)
    write_record(runs, record)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="the calls' files_at folders, in call order")
    parser.add_argument("--runs", default="runs/testbed_pinned", help="where the testbed's runs go")
    parser.add_argument("--record", default="docs/records/testbed_pinned_runs.tar.xz")
    parser.add_argument("--captures", default="runs/testbed_captures", help="where capture files go")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not os.path.isdir(f)]
    if missing:
        parser.error(f"no such folder: {missing}")
    archives = [os.path.join(f, "testbed_runs.tgz") for f in args.folders
                if os.path.exists(os.path.join(f, "testbed_runs.tgz"))]
    if archives:
        land_testbed(archives, args.runs, args.record)
        print(f"{', '.join(archives)} -> {args.runs} (merged, in call order) -> {args.record}")
    captures = sorted(os.path.join(f, name) for f in args.folders for name in os.listdir(f)
                      if name.startswith("captures_") and name.endswith(".tar"))
    for archive in captures:
        with tarfile.open(archive) as tar:
            _members_under_testbed(tar, archive)
        extract_into(archive, args.captures)
        print(f"{archive} -> {args.captures}")
    for doc in DOCS:
        target = os.path.join(args.docs, doc)
        before = sections(target)
        for folder in args.folders:
            source = os.path.join(folder, doc)
            if os.path.exists(source):
                for name in land_sections(source, target, before):
                    print(f"{source} [{name}] -> {target}")


if __name__ == "__main__":
    main()
