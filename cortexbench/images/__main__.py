"""``python -m cortexbench.images``: make a synthetic ImageNet-like set, fetch one from a URL list, or
summarise a directory of images.

    python -m cortexbench.images synth --count 500 --out data/images [--seed 0] [--workers N]
    python -m cortexbench.images fetch --urls fall11_urls.txt --count 1000 [--out data/fetched]
    python -m cortexbench.images info data/images

Summaries go to stdout, the progress bar to stderr (``--quiet`` turns it off).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cortexbench.cli import ArgumentParser, parse_or_exit_code, run_main

PROG = "python -m cortexbench.images"
# fetch's own directory, apart from the synthetic set that single and stream make in data/images: a fetched
# set in data/images would be mixed with it (and the input pool takes the first images, the synthetic ones).
FETCH_DIR = Path("data/fetched")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Image sets for cortexbench: synthesise, fetch, inspect.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,fetch,info}")

    s = sub.add_parser("synth", help="write a synthetic ImageNet-like JPEG set (resumable)",
                       description="Write DIR/<nnnn>/img_<index>.jpg from sample photos; files already there are kept.")
    s.add_argument("--count", type=int, required=True, metavar="N", help="how many images the set has")
    s.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write them")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    s.add_argument("--workers", type=int, default=None, metavar="W", help="processes (default: CPU count)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("fetch", help="download images from an ImageNet-style URL list (id<TAB>url)",
                       description="Download until DIR holds N images of the list; resumable; Ctrl-C keeps what is done.")
    f.add_argument("--urls", type=Path, required=True, metavar="FILE", help="the URL list, one 'id<TAB>url' per line")
    f.add_argument("--out", type=Path, default=FETCH_DIR, metavar="DIR",
                   help=f"where to write DIR/<id>.jpg (default {FETCH_DIR}; use it with --img-dir)")
    f.add_argument("--count", type=int, required=True, metavar="N",
                   help="how many good images to end with (exit 1 when the list runs out first)")
    f.add_argument("--concurrency", type=int, default=32, metavar="C", help="requests at a time (default 32)")
    f.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per attempt (default 10)")
    f.add_argument("--retries", type=int, default=2, metavar="R", help="retries on time-outs, 5xx (default 2)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="count, size and decode every image of a directory",
                       description="Decode every .jpg/.jpeg/.png under DIR and summarise the set.")
    i.add_argument("dir", type=Path, metavar="DIR")
    return p


def _synth(args: argparse.Namespace) -> int:
    from cortexbench.images.synth import synthesize

    summary = synthesize(args.out, args.count, seed=args.seed, workers=args.workers, progress=not args.quiet)
    print("\n".join(summary.lines()))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from cortexbench.errors import CortexbenchError
    from cortexbench.images.fetch import fetch, foreign_images

    others = foreign_images(args.out)
    if others:
        print(f"{PROG} fetch: warning: {args.out} already holds {others} image(s) in sub-directories that fetch "
              f"did not write (a synthetic set?); a stream over {args.out} would mix them with the fetched "
              f"ones; fetch into a directory of its own (the default, {FETCH_DIR})", file=sys.stderr)
    summary = fetch(args.urls, args.out, args.count, concurrency=args.concurrency, timeout_s=args.timeout,
                    retries=args.retries, progress=not args.quiet)
    print("\n".join(summary.lines()))
    if summary.interrupted:
        print(f"{PROG} fetch: interrupted; finished files were kept", file=sys.stderr)
        return 130
    if summary.have < summary.requested:
        raise CortexbenchError(f"--count {summary.requested}: got {summary.have} image(s); the list ran out of "
                               f"usable URLs after {summary.lines_read} lines ({summary.dead_total} dead); "
                               "use a longer list or a smaller --count")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cortexbench.images.dataset import scan

    print("\n".join(scan(args.dir).lines()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (2 for bad input, 130 after Ctrl-C)."""
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a bad flag (already reported in one line)
        return args
    body = {"synth": _synth, "fetch": _fetch, "info": _info}[args.command]
    return run_main(lambda: body(args), f"{PROG} {args.command}")


if __name__ == "__main__":
    sys.exit(main())
