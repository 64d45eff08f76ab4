"""The ``cortexbench`` console script and what every ``python -m cortexbench.X`` shares.

``cortexbench`` with no argument lists the commands; ``cortexbench X ...`` runs ``python -m cortexbench.X``.
``run_main`` is the only place that catches ``CortexbenchError``: it prints one line to stderr and
returns the error's exit code (2 for bad input, 1 for a failure, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cortexbench.errors import CortexbenchError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one line)
    "stream": ("cortexbench.stream", "the image stream over Ray workers: cached vs cold vs LRU, per-image latency"),
    "single": ("cortexbench.single", "the single-device sweep: models x batch sizes x devices x backend"),
    "experiments": ("cortexbench.experiments", "the small-model experiments: mlp2 epochs, mnist against batch size, digits per op"),
    "models": ("cortexbench.models.__main__", "list models; export them with random weights to model_dir"),
    "serve": ("cortexbench.serve", "the Ray workers behind an HTTP gateway (Open Inference Protocol v2)"),
    "images": ("cortexbench.images.__main__", "make a synthetic ImageNet-like set, or fetch one from a URL list"),
    "report": ("cortexbench.report.__main__", "a run's report.md and self-contained report.html; several runs compared"),
    "traces": ("cortexbench.traces", "write a test request trace (time_s,model rows) whose model popularity shifts"),
    "dashboard": ("cortexbench.dashboard", "build the Grafana dashboard (grafana-foundation-sdk) and write its JSON"),
}


TOKEN_ENV = "CORTEXBENCH_TOKEN"  # the bearer token: what `serve` checks, what the HTTP target sends


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """Parse ``argv`` (``sys.argv[1:]`` when None); ``--help`` or a bad flag (one line already printed)
    gives the exit code to return instead of raising SystemExit (0 for --help, 2 for a bad flag)."""
    try:
        return parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def run_main(body: Callable[[], int], prog: str) -> int:
    """Run a command body; turn a CortexbenchError or Ctrl-C into one line and an exit code."""
    try:
        return body()
    except CortexbenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def asks_for_gpus(gpus: str | None) -> bool:
    """Whether ``--gpus`` asks for one GPU worker or more ('auto' and bad values do not; the config check
    reports a bad value)."""
    try:
        return gpus is not None and int(gpus) > 0
    except ValueError:
        return False


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by single and stream; each overrides its config.json key (see overrides_from)."""
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: ./config.json, else the built-in default)")
    p.add_argument("--models", metavar="A,B", help="models or groups (imagenet, small, all) [models]")
    p.add_argument("--backend", metavar="NAME", help="mxnet, torch, onnxruntime or auto [backend]")
    p.add_argument("--precision", metavar="P", help="fp32 or fp16 [precision]")
    p.add_argument("--result-dir", metavar="DIR", help="where results go [result_dir]")
    p.add_argument("--model-dir", metavar="DIR", help="model files [model_dir]")
    p.add_argument("--img-dir", metavar="DIR", help="images, searched recursively [img_dir]")
    p.add_argument("--seed", type=int, metavar="N", help="random seed [seed]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


COMMON_KEYS = {"models": "models", "backend": "backend", "precision": "precision", "result_dir": "result_dir",
               "model_dir": "model_dir", "img_dir": "img_dir", "seed": "seed"}


def overrides_from(args: argparse.Namespace, keys: dict[str, str]) -> dict[str, Any]:
    """Map parsed flags (attribute -> dotted config key) to overrides; flags not given are left out."""
    out: dict[str, Any] = {}
    for attr, key in keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out


def flags_of(keys: dict[str, str]) -> dict[str, str]:
    """Dotted config key -> the flag that sets it (``batchsize`` -> ``--batch-sizes``), for error messages."""
    return {key: "--" + attr.replace("_", "-") for attr, key in keys.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``cortexbench [COMMAND] [ARGS]``: list the commands, or run one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: cortexbench COMMAND [ARGS]   (or: python -m cortexbench.COMMAND [ARGS])\n\ncommands:")
        width = max(map(len, COMMANDS))
        for name, (_, line) in COMMANDS.items():
            print(f"  {name:<{width}} {line}")
        print("\n'cortexbench COMMAND --help' shows a command's flags; docs/usage.md has examples.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from cortexbench.errors import did_you_mean

        print(f"cortexbench: error: unknown command '{name}'{did_you_mean(name, COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
