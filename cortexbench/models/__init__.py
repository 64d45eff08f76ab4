"""Models: the registry of named models, their backends, and ``python -m cortexbench.models``."""
