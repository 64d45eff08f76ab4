"""The one exception tree of cortexbench.

Every error a user can cause or fix is one of these; each message says what is wrong and what to do.
Only the command-line layer (``cortexbench.cli.run_main``) catches them: it prints one line and exits
with the error's ``exit_code``.  Everything else raises and lets them travel.

::

    CortexbenchError                    exit 1   (runtime failure)
    ├── UsageError                      exit 2   (bad input: fix the command or the files)
    │   ├── ConfigError                          unknown / mistyped key, bad value, missing directory
    │   ├── ModelNotFoundError                   unknown model name, or no file for it in model_dir
    │   ├── ModelFileError                       a model file that is corrupt or of the wrong model
    │   ├── DatasetError                         empty img_dir, unreadable image set
    │   │   └── ImageDecodeError                 one image file that does not decode (counted mid-run)
    │   ├── DeviceError                          a device asked for that this machine does not have
    │   ├── BackendUnavailableError              a backend whose extra is not installed
    │   └── RequestError                         an HTTP request the gateway refuses (its status code)
    ├── WorkerError                              a worker failed in a way retries could not hide
    │   └── WorkerLostError                      a worker process died (its images are retried elsewhere)
    └── Interrupted                     exit 130 (Ctrl-C; partial results were written)
        └── Terminated                  exit 143 (SIGTERM, as timeout, systemd and Kubernetes send it)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CortexbenchError(Exception):
    """Base of every error cortexbench raises on purpose."""

    exit_code = 1


class UsageError(CortexbenchError):
    """The user's input is wrong; the message says how to fix it."""

    exit_code = 2


class ConfigError(UsageError):
    """config.json or a command-line flag is wrong."""


class ModelNotFoundError(UsageError):
    """A model name that is not registered, or whose file is not in model_dir."""


class ModelFileError(UsageError):
    """A model file exists but cannot be loaded (corrupt, truncated, wrong model)."""


class DatasetError(UsageError):
    """The image set cannot be used (empty directory, nothing decodes)."""


class ImageDecodeError(DatasetError):
    """One image file that cannot be read or decoded; mid-run it is counted as an input error, not fatal."""


class DeviceError(UsageError):
    """A device was asked for that this machine does not have."""


class BackendUnavailableError(UsageError):
    """A backend whose Python package is not installed."""


class RequestError(UsageError):
    """A request to the serving gateway that it refuses: ``status`` is the HTTP status code it answers
    (400 malformed, 401 no or wrong token, 404 unknown model, 413 too large, 422 well-formed but wrong)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WorkerError(CortexbenchError):
    """A worker failed and the failure could not be retried away."""


class WorkerLostError(WorkerError):
    """A worker's process died; the driver retries its images on other workers."""


class Interrupted(CortexbenchError):
    """The user pressed Ctrl-C; what was measured so far has been written."""

    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM: handled as Ctrl-C is (in-flight images drain, partial results are written)."""

    exit_code = 143


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest choice, or a list of valid choices when none is near."""
    options = sorted(set(choices))
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if near:
        return f" (did you mean '{near[0]}'?)"
    if len(options) <= 12:
        return f" (valid: {', '.join(options)})"
    return ""
