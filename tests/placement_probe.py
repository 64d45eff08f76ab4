"""Run by tests/test_multinode.py in a process of its own (the test's process may hold a Ray already): join
the cluster at ``argv[1]``, start ``argv[4]`` GPU workers with the null model (``argv[2]`` model_dir,
``argv[3]`` image_dir) as the stream does, plan ``argv[5]`` driver shards over them as the coordinator does
(``schedule.shard_workers``), start the shards, and print as JSON where each worker and each shard runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cortexbench import cluster, ray_shards
from cortexbench.images.dataset import list_images
from cortexbench.schedule import shard_workers
from cortexbench.worker import WorkerSpec


def node_of(actor: Any) -> str:
    """Run inside an actor (``__ray_call__``): the Ray node it runs on."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def main(address: str, model_dir: str, image_dir: str, n_workers: int, n_shards: int) -> dict[str, Any]:
    cluster.init_ray(address)
    images = tuple(str(p) for p in list_images(Path(image_dir)))
    specs = [WorkerSpec(name=f"gpu{i}", device="gpu:0", backend="onnxruntime", model_dir=model_dir,
                        models=("null",), images=images, lanes=1, image_pool=8) for i in range(n_workers)]
    target = cluster.start_workers(specs, gpu=True, cpus_each=1.0, threads_each=1)
    try:
        parts = shard_workers(target.node_ids, n_shards)
        shards = ray_shards.start_shards([node for _, node in parts])
        ran_on = cluster.get([cluster.ADAPTER.call(s, "__ray_call__", node_of) for s in shards], 120)
        return {"workers": [{"name": s.name, "node_id": i["node_id"], "gpu_ids": i["gpu_ids"]}
                            for s, i in zip(target.specs, target.infos, strict=True)],
                "shards": [{"worker_ids": list(ids), "planned_node": node, "ran_on": on}
                           for (ids, node), on in zip(parts, ran_on, strict=True)]}
    finally:
        target.close()
        cluster.shutdown_ray()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
