"""The serving gateway of ``python -m cortexbench.serve``: cortexbench's workers behind HTTP.

- ``v2.py``: the Open Inference Protocol (v2) bodies: parse and check an inference request (JSON tensors
  and the binary tensor extension), write the answer, model metadata; the top-k of ``/v1`` (plain numpy).
- ``pool.py``: ``Gateway``: which worker runs a request (the stream's balancers), requests in flight and
  the back-pressure bound, lost workers taken out and recovered, the per-image metrics; the workers are
  reached through a ``TensorCaller`` (``RayCaller`` for the Ray target, ``LocalCaller`` in process).
- ``shm.py``: ``SharedSlots``: a request for a worker on the gateway's machine written once into a
  ``/dev/shm`` slot, so that the call carries the slot's path; ``SlotReader``, the worker's side.
- ``channel.py``: the direct channel to a worker on the gateway's machine (a Unix socket into its
  process, beside Ray's actor call): ``ChannelServer`` in the worker, ``WorkerChannel`` in the gateway.
- ``app.py``: the FastAPI app: routes, the bearer token, the body size limit, errors as JSON, /metrics.

Only ``app.py`` imports FastAPI; nothing here imports Ray (``cluster.RayTarget`` does the Ray calls).
"""
