"""Land what a lent GPU machine's calls brought back (their `files_at` folders) in this checkout, in call order:

    python scripts/land_device_results.py /work/.device/7 /work/.device/8 ...

- `testbed_runs.tgz` (gpu_session.sh's testbed snapshot, the whole study folder `testbed/`): the latest one
  replaces `--runs` (default runs/testbed_pinned) and is copied to `--record` (the archive docs/ keeps) and to
  `.device_state/testbed_runs.tgz` (what the next fresh machine starts from);
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


def land_testbed(archive: str, runs: str, record: str, state: str) -> None:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        if not names or any(n.split("/")[0] != "testbed" for n in names):
            raise SystemExit(f"{archive}: not a testbed snapshot (every member under testbed/)")
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, filter="data")
            if os.path.exists(runs):
                shutil.rmtree(runs)
            os.makedirs(os.path.dirname(runs) or ".", exist_ok=True)
            shutil.move(os.path.join(tmp, "testbed"), runs)
    for path in (record, state):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        shutil.copyfile(archive, path)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="the calls' files_at folders, in call order")
    parser.add_argument("--runs", default="runs/testbed_pinned", help="where the testbed's runs go")
    parser.add_argument("--record", default="docs/records/testbed_gpt-25m-long_pinned_h200.tgz")
    parser.add_argument("--state", default=".device_state/testbed_runs.tgz")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not os.path.isdir(f)]
    if missing:
        parser.error(f"no such folder: {missing}")
    archives = [os.path.join(f, "testbed_runs.tgz") for f in args.folders
                if os.path.exists(os.path.join(f, "testbed_runs.tgz"))]
    if archives:
        land_testbed(archives[-1], args.runs, args.record, args.state)
        print(f"{archives[-1]} -> {args.runs}, {args.record}, {args.state}")
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
