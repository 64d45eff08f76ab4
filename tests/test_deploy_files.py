"""deploy/ray/cluster.yaml (``ray up``) and deploy/k8s/raycluster.yaml (KubeRay) parse and carry what matters:
GPU resources on the worker nodes and none on the head, the command that installs or runs cortexbench, and
the metrics ports (Ray's exported on every node, cortexbench's /metrics on the head) with their scrape
annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_the_ray_cluster_config_has_gpu_workers_installs_cortexbench_and_exports_ray_metrics():
    (cfg,) = _load_all(DEPLOY / "ray" / "cluster.yaml")
    assert cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # no worker lands on the head
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= t["min_workers"] >= 1 for t in workers)
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "cortexbench" in setup and "ray[default]==" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--metrics-export-port=8090" in " ".join(cfg[key]), key
    assert "--head" in " ".join(cfg["head_start_ray_commands"])


def test_the_kuberay_cluster_has_a_gpu_group_scrape_annotations_and_runs_the_stream():
    docs = {d["kind"]: d for d in _load_all(DEPLOY / "k8s" / "raycluster.yaml")}
    assert set(docs) == {"RayCluster", "Service", "RayJob"}
    spec = docs["RayCluster"]["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["metrics-export-port"] == "8090"
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["rayStartParams"]["metrics-export-port"] == "8090"
    for tmpl in (head["template"], group["template"]):  # Ray's metrics on every pod
        ann = tmpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8090"
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["cortexbench"] == 8000 and head_ports["metrics"] == 8090
    svc = docs["Service"]  # cortexbench's /metrics on the head, through a Service annotated for scraping
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert svc["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "cortexbench"
    job = docs["RayJob"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == docs["RayCluster"]["metadata"]["name"]
    entry = job["entrypoint"]
    assert "python -m cortexbench.stream" in entry and "--address auto" in entry and "--gpus" in entry
    assert "--metrics-host 0.0.0.0" in entry and "--metrics-port 8000" in entry
