"""Images: the image set on disk (find, read, decode, preprocess), a synthetic ImageNet-like set, and a
downloader for ImageNet-style URL lists.  ``python -m cortexbench.images`` runs ``synth``, ``fetch`` and ``info``.
"""

from cortexbench.images.dataset import (
    DatasetSummary,
    decode,
    ensure_images,
    list_images,
    load_batch,
    load_input,
    preprocess,
    read_bytes,
    scan,
)
from cortexbench.images.fetch import FetchSummary, fetch
from cortexbench.images.synth import SynthSummary, synthesize

__all__ = [
    "DatasetSummary",
    "FetchSummary",
    "SynthSummary",
    "decode",
    "ensure_images",
    "fetch",
    "list_images",
    "load_batch",
    "load_input",
    "preprocess",
    "read_bytes",
    "scan",
    "synthesize",
]
