"""``python -m cortexbench.report DIR [DIR ...]``: a run's report.md and a self-contained report.html, or
several runs compared side by side.

One run directory: its report.md is rendered again from results.json (the pictures that follow from
results.json alone are drawn when missing) and report.html is written beside it: the same report, every
plot embedded, nothing else needed to open it.  With ``--out DIR`` both go there instead (with the plots).

Several directories (or one folder of repeats): ``report.compare``'s tables, ``compare.png``, report.md and
report.html in ``--out DIR``, by default a new ``results/<stamp>-compare`` directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cortexbench.cli import ArgumentParser, parse_or_exit_code, run_main
from cortexbench.errors import UsageError
from cortexbench.report import compare, render
from cortexbench.report.html import convert, to_html
from cortexbench.results import new_run_dir, read_results, write_bytes, write_text

PROG = "python -m cortexbench.report"
DEFAULT_RESULT_DIR = Path("results")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Render result directories to report.md and a self-contained "
                       "report.html; given several, compare them against the first.",
                       epilog=f"examples:\n  {PROG} results/20260101-120000-stream\n"
                              f"  {PROG} results/before results/after --out results/before-after")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="a run directory, or a folder of run directories (repeats of one run)")
    p.add_argument("--out", metavar="DIR", help="where the report goes (default: the run directory for one "
                   "run, a new results/<stamp>-compare for several)")
    return p


def write_report(markdown: str, base_dir: Path, out_dir: Path, title: str) -> tuple[Path, Path]:
    """report.md and report.html in ``out_dir``; the images come from ``base_dir`` (copied to ``out_dir``
    when that is another directory, so that report.md shows them too)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _, embedded, _ = convert(markdown, base_dir)
    if out_dir.resolve() != base_dir.resolve():
        for name in dict.fromkeys(embedded):
            write_bytes(out_dir / name, (base_dir / name).read_bytes())
    md = write_text(out_dir / "report.md", markdown)
    page = write_text(out_dir / "report.html", to_html(markdown, base_dir, title))
    return md, page


def report_one(run_dir: Path, out: Path | None) -> Path:
    doc = read_results(run_dir)
    render.draw_derived(doc, run_dir, missing_only=True)
    markdown = render.run_markdown(doc, run_dir)
    _, page = write_report(markdown, run_dir, out or run_dir, f"cortexbench {doc.get('kind')}: {run_dir.name}")
    return page


def report_many(paths: Sequence[Path], out: Path | None) -> Path:
    runs = compare.load_runs(paths)
    rows = compare.compare(runs)
    out_dir = out if out is not None else new_run_dir(DEFAULT_RESULT_DIR, "compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = None
    if rows:
        from cortexbench.report.compare_plots import plot_compare

        plot = plot_compare(rows, [r.label for r in runs], out_dir / compare.PLOT_NAME).name
    markdown = compare.render_markdown(runs, rows, plot=plot)
    print(compare.console(rows, runs[0].kind), end="")
    _, page = write_report(markdown, out_dir, out_dir, f"cortexbench compare: {', '.join(r.label for r in runs)}")
    return page


def _body(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if len(dirs) == 1 and compare.is_run_dir(dirs[0]):
        page = report_one(dirs[0], out)
    else:
        page = report_many(dirs, out)
    print(f"report: {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a bad flag (one line, exit 2)
        return args
    return run_main(lambda: _body(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
