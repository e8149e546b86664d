"""Land what a lent GPU machine's calls brought back (their `files_at` folders) in this checkout, in call order:

    python scripts/land_device_results.py /work/.device/7 /work/.device/8 ...

- `testbed_runs.tgz` (gpu_session.sh's testbed snapshot: the files under `testbed/` that the lease wrote, not the
  runs it started from): each is merged into `--runs` (default runs/testbed_pinned), a later call's file replacing
  an earlier one's; `--runs` starts from `--record` when this checkout has none (a fresh clone). Runs that stop
  short of their schedule (the session's device time cut them) are left out of both, and kept, their evaluations
  only, in `--unfinished_record` (see `keep_unfinished`). Then `--record`
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
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lshmoe_pretrain import benchmarking as bench  # noqa: E402
from lshmoe_pretrain import quality_study as study  # noqa: E402
from lshmoe_pretrain.run_records import round_metrics  # noqa: E402

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


CAPTURES = "captures"  # a run's captures/ folder stays out of the tracked record, however it got into the runs


def _record_member(tar: tarfile.TarFile, path: str, arcname: str) -> None:
    """The file at `path` into the record as `arcname`; a metrics.jsonl through `run_records.round_metrics`."""
    member = tar.gettarinfo(path, arcname)
    if os.path.basename(path) != "metrics.jsonl":
        with open(path, "rb") as handle:
            tar.addfile(member, handle)
        return
    with open(path, "rb") as handle:
        data = round_metrics(handle.read())
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def write_record(runs: str, record: str, top: str = "testbed") -> None:
    """`runs` as the archive docs/ keeps: members under `top`/ (no captures), the digits no report reads rounded
    (`run_records.round_metrics`), xz preset 9 (its extreme variant saves 2% more in six times the time), written
    beside and then moved, so that a failure leaves the old record."""
    os.makedirs(os.path.dirname(record) or ".", exist_ok=True)
    with tarfile.open(record + ".part", "w:xz", preset=9) as tar:
        for folder, dirs, files in os.walk(runs):
            dirs[:] = sorted(name for name in dirs if name != CAPTURES)
            arc_folder = os.path.normpath(os.path.join(top, os.path.relpath(folder, runs)))
            tar.add(folder, arc_folder, recursive=False)
            for name in sorted(name for name in files if name != CAPTURES):
                _record_member(tar, os.path.join(folder, name), os.path.join(arc_folder, name))
    os.replace(record + ".part", record)


def rewrite_record(record: str) -> None:
    """Write an existing record again as `write_record` writes one (its members under the one folder they share):
    for the records written before the wall-clock rounding (the CPU testbeds'), which travel with every GPU call
    too."""
    with tarfile.open(record) as tar:
        tops = {name.split("/")[0] for name in tar.getnames()}
        if len(tops) != 1:
            raise SystemExit(f"{record}: its members are not under one folder ({sorted(tops)})")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, filter="data")
            top = tops.pop()
            write_record(os.path.join(tmp, top), record, top)


def unfinished_runs(runs: str) -> List[str]:
    """The run folders under `runs` whose records stop short of their schedule (run.json's train_steps, with the
    final validation): runs a lease's device time cut. A later lease trains such a run again from its first step,
    since checkpoints never come back, so the main record has no use for it (the testbed's reports skip it too;
    `keep_unfinished` keeps its evaluations apart)."""
    found = []
    for folder in (os.path.join(runs, relative) for relative in run_folders(runs)):
        try:
            with open(os.path.join(folder, "run.json")) as handle:
                steps = json.load(handle)["train_steps"]
        except (ValueError, KeyError, TypeError):   # not a training run's record
            continue
        if not study.finished(folder, steps):
            found.append(folder)
    return sorted(found)


def _evaluations(run_dir: str) -> List[dict]:
    """A run's evaluated records and its last one (the step it stopped at), by step."""
    records = study.read_metrics(run_dir)
    return [r for r in records[:-1] if "valid_loss" in r] + records[-1:]


def _last_step(run_dir: str) -> int:
    records = study.read_metrics(run_dir)
    return records[-1]["step"] if records else -1


def keep_unfinished(dropped: Sequence[str], runs: str, kept: str, record: str) -> List[str]:
    """Keep the runs a lease's device time cut (`dropped`, folders under `runs`) under `kept` (started from `record`
    where `kept` does not exist): run.json and the evaluated records only, a few lines a run, since a later lease
    trains the run again from its first step. The GPU's runs are deterministic (two leases trained the same six runs
    to the same bits, 2026-12-07), so a cut run's evaluations are the first ones of the run that later finishes,
    and `compare_quality.py scatter --at_step` can read a gap before then. Of two cut copies of a run the one that
    got further stays; a run now finished under `runs` leaves `kept`. Writes `record` from `kept`; the kept folders
    (relative to `kept`) this landing added or replaced."""
    if not os.path.exists(kept) and os.path.exists(record):
        extract_into(record, kept)
    added = []
    for folder in dropped:
        relative = os.path.relpath(folder, runs)
        target = os.path.join(kept, relative)
        if _last_step(target) > _last_step(folder):
            continue
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        shutil.copy2(os.path.join(folder, "run.json"), target)
        with open(os.path.join(target, "metrics.jsonl"), "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in _evaluations(folder))
        added.append(relative)
    cut = {os.path.normpath(folder) for folder in dropped}
    for relative in run_folders(kept):
        here = os.path.normpath(os.path.join(runs, relative))
        if os.path.isdir(here) and here not in cut:   # it finished in a later lease
            _remove_run(os.path.join(kept, relative), kept)
    if os.path.isdir(kept):
        write_record(kept, record)
    return sorted(added)


def run_folders(root: str) -> List[str]:
    """Every run folder under `root` (one with a run.json), relative to it."""
    found = []
    for folder, _, files in os.walk(root):
        if "run.json" in files:
            found.append(os.path.relpath(folder, root))
    return sorted(found)


def _remove_run(folder: str, root: str) -> None:
    """Remove a run folder and the folders it leaves empty, so no report finds a variant with no run."""
    shutil.rmtree(folder)
    parent = os.path.dirname(folder)
    while os.path.abspath(parent) != os.path.abspath(root) and not os.listdir(parent):
        os.rmdir(parent)
        parent = os.path.dirname(parent)


def land_testbed(archives: Sequence[str], runs: str, record: str, kept: str = None,
                 kept_record: str = None) -> List[str]:
    """Merge each call's snapshot, in order, into `runs` (started from `record` where `runs` does not exist), drop
    the runs that did not finish (`unfinished_runs`; kept by `keep_unfinished` under `kept` when given), then write
    `record` from `runs`; the dropped folders."""
    for archive in archives:   # every snapshot is checked before anything is written
        with tarfile.open(archive) as tar:
            _members_under_testbed(tar, archive)
    if not os.path.exists(runs) and os.path.exists(record):
        extract_into(record, runs)
    for archive in archives:
        extract_into(archive, runs)
    dropped = unfinished_runs(runs)
    if kept is not None:
        keep_unfinished(dropped, runs, kept, kept_record)
    for folder in dropped:
        _remove_run(folder, runs)
    write_record(runs, record)
    return dropped


def unfinished_record_of(record: str) -> str:
    """Where a record's cut runs are kept: docs/records/testbed_pinned_runs.tar.xz ->
    docs/records/testbed_pinned_unfinished.tar.xz (beside it, so a landing into a scratch record keeps them there)."""
    folder, name = os.path.split(record)
    stem = name[:-len(".tar.xz")] if name.endswith(".tar.xz") else name
    stem = stem[:-len("_runs")] if stem.endswith("_runs") else stem
    return os.path.join(folder, stem + "_unfinished.tar.xz")


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="the calls' files_at folders, in call order")
    parser.add_argument("--runs", default="runs/testbed_pinned", help="where the testbed's runs go")
    parser.add_argument("--record", default="docs/records/testbed_pinned_runs.tar.xz")
    parser.add_argument("--unfinished_runs", default=None,
                        help="where the runs a lease cut are kept, their evaluations only (default: --runs with "
                             "_unfinished appended: runs/testbed_pinned_unfinished)")
    parser.add_argument("--unfinished_record", default=None,
                        help="the tracked record of --unfinished_runs (default: --record's name with _unfinished "
                             "for _runs, or appended: docs/records/testbed_pinned_unfinished.tar.xz)")
    parser.add_argument("--captures", default="runs/testbed_captures", help="where capture files go")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--rewrite", nargs="+", default=[], metavar="RECORD",
                        help="write these .tar.xz records again as a landing writes one (the digits no report reads "
                             "rounded, xz preset 9), then land the folders, if any")
    args = parser.parse_args(argv)
    args.unfinished_runs = args.unfinished_runs or os.path.normpath(args.runs) + "_unfinished"
    args.unfinished_record = args.unfinished_record or unfinished_record_of(args.record)
    for record in args.rewrite:
        if not record.endswith(".tar.xz"):
            parser.error(f"--rewrite takes .tar.xz records: {record}")
        before = os.path.getsize(record)
        rewrite_record(record)
        print(f"{record}: {before} -> {os.path.getsize(record)} bytes")
    if not args.folders and args.rewrite:
        return
    if not args.folders:
        parser.error("the calls' files_at folders are needed (or --rewrite)")
    missing = [f for f in args.folders if not os.path.isdir(f)]
    if missing:
        parser.error(f"no such folder: {missing}")
    archives = [os.path.join(f, "testbed_runs.tgz") for f in args.folders
                if os.path.exists(os.path.join(f, "testbed_runs.tgz"))]
    if archives:
        dropped = land_testbed(archives, args.runs, args.record, args.unfinished_runs, args.unfinished_record)
        print(f"{', '.join(archives)} -> {args.runs} (merged, in call order) -> {args.record}")
        for folder in dropped:
            print(f"left out, unfinished (a later lease trains it from the start; its evaluations kept in "
                  f"{args.unfinished_record}): {folder}")
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
