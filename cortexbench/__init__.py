"""cortexbench: a distributed inference-serving load tester.

``python -m cortexbench`` (or the ``cortexbench`` script) lists the commands.
"""

__version__ = "0.1.0"
