"""What each wire format does to the gradients crossing the all-to-all's backward and to the expert weight gradients
they produce, on captures of a training run (pretrain_*_moe.py --capture_at ..., capture format 2). CPU only.

    python scripts/gradient_rounding.py runs/gpt_long/captures --report docs/compressibility.md \\
        --section gpt_long_gradients --records docs/records/gpt_long_gradients.json

prints every measurement, and with --report writes the tables and each capture's provenance into that section of the
file; --records keeps the numbers as JSON.
"""
import argparse

import torch

from lshmoe_pretrain import capture, gradient_rounding
from lshmoe_pretrain.benchmarking import command_line, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captures", nargs="+", help="capture files, or directories of them (step*_layer*.pt)")
    parser.add_argument("--report", default=None, help="markdown file to write the section into "
                        "(e.g. docs/compressibility.md); without it nothing is written")
    parser.add_argument("--section", default="gradient_rounding", help="name of the section in --report")
    parser.add_argument("--title", default="What the wire formats do to the gradients of the experts")
    parser.add_argument("--note", action="append", default=[], help="a line of the section's preamble (repeatable): "
                        "where the run ran, what it can and cannot show")
    parser.add_argument("--records", default=None, help="also write every measurement as JSON here")
    parser.add_argument("--draws", type=int, nargs="+", default=list(gradient_rounding.DRAWS),
                        help="K: the mean of the weight gradients over K stochastic draws (default 1 4 16 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if min(args.draws) < 1 or 1 not in args.draws:
        parser.error(f"--draws must be counts >= 1 and include 1, got {args.draws}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = capture.capture_files(args.captures)
    except ValueError as error:
        parser.error(str(error))
    results = [gradient_rounding.measure(path, sorted(set(args.draws))) for path in paths]
    if args.records:
        capture.write_records(args.records, results)
    if not args.report:
        print(f"section '{args.section}' not written (pass --report PATH, e.g. --report docs/compressibility.md)")
        return
    write_section(args.report, args.section,
                  gradient_rounding.report(results, args.title, command_line(), args.note))
    print(f"wrote {args.report} [{args.section}]")


if __name__ == "__main__":
    main()
