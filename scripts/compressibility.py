"""Bytes on the wire against the error of the expert outputs, for every codec of lshmoe_pretrain.codecs, on captures
of a training run (pretrain_*_moe.py --capture_at ...). CPU only.

    python scripts/compressibility.py runs/gpt_long/captures --report docs/compressibility.md --section gpt_long

prints every measurement, and with --report writes the tables, each capture's provenance and the plot into that
section of the file (the plot beside it, <section>.png unless --plot says otherwise); --records keeps the numbers
as JSON.
"""
import argparse
import os

import torch

from lshmoe_pretrain import capture, compressibility
from lshmoe_pretrain.benchmarking import command_line, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captures", nargs="+", help="capture files, or directories of them (step*_layer*.pt)")
    parser.add_argument("--report", default=None, help="markdown file to write the section into "
                        "(e.g. docs/compressibility.md); without it nothing is written")
    parser.add_argument("--section", default="compressibility", help="name of the section in --report")
    parser.add_argument("--title", default="How compressible the expert inputs are")
    parser.add_argument("--plot", default=None, help="the figure; default: next to --report, compressibility_"
                        "<section>.png")
    parser.add_argument("--records", default=None, help="also write every measurement as JSON here")
    parser.add_argument("--max_slots", type=int, default=None, help="measure only the first N captured slots of "
                        "each expert (a subsample: the report says so)")
    parser.add_argument("--only", nargs="+", default=None, help="only the codecs whose family or label starts "
                        "with one of these (e.g. 'LSH rate' 'per token')")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.max_slots is not None and args.max_slots < 1:
        parser.error(f"--max_slots must be >= 1, got {args.max_slots}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = capture.capture_files(args.captures)
    except ValueError as error:
        parser.error(str(error))
    results = [compressibility.measure(path, args.max_slots, args.only) for path in paths]
    if args.records:
        capture.write_records(args.records, results)
    if not args.report:
        print(f"section '{args.section}' not written (pass --report PATH, e.g. --report docs/compressibility.md)")
        return
    plot = args.plot or os.path.join(os.path.dirname(args.report), f"compressibility_{args.section}.png")
    compressibility.plot(results, plot)
    write_section(args.report, args.section, compressibility.report(results, args.title, plot, command_line()))
    print(f"wrote {args.report} [{args.section}] and {plot}")


if __name__ == "__main__":
    main()
