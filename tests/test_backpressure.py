"""Back-pressure on real Ray: an open-loop rate ~100x what two null-model workers can serve.

The excess must wait in a bounded place and show as lateness, never pile up as an unbounded queue in the
driver or as a backlog of Ray calls.  Measured from the driver's own counters (RSS at this size is noise):

- calls in flight per worker <= ``depth`` (the Ray task backlog a worker can have);
- images queued in the driver (assigned to a worker, not yet sent) <= ``Driver.backlog``
  (= workers x depth x max_group: one more full round of calls); the rest wait unassigned in the
  precomputed schedule, where they cost nothing new;
- every image accounted (sent = ok + failed = the schedule), and the lateness reported (late share, p99 send
  delay), since latency counts from each image's due time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cortexbench import cluster
from cortexbench.driver import Driver, DriverOptions, drive
from cortexbench.images.dataset import list_images
from cortexbench.machine import host_memory_bytes
from cortexbench.ray_handles import make_handles
from cortexbench.report.stream_summary import histograms, summarize_mode
from cortexbench.schedule import make_schedule
from cortexbench.worker import WorkerSpec

pytestmark = pytest.mark.ray

IMAGES = 3000
DEPTH = 8
NULL_S = 0.002  # the null model's predict: ~500 images/s per worker at most, ~1,000/s for the two
RATE = 100_000.0  # ~100x that: every image is due within about 0.03 s
RSS_GROWTH_BOUND = 64 << 20  # a sanity bound on the driver's RSS after the run (Ray's own buffers included)


@pytest.fixture(scope="module")
def null_pool(ray_session: None, model_dir: Path, image_dir: Path) -> Iterator[cluster.RayTarget]:
    images = tuple(str(p) for p in list_images(image_dir))
    specs = [WorkerSpec(name=f"bp{i}", device="cpu", backend="mxnet", model_dir=str(model_dir),
                        models=(f"null:{NULL_S}",), images=images, lanes=1, image_pool=8) for i in range(2)]
    pool = cluster.start_workers(specs, gpu=False, cpus_each=0.5, threads_each=1)
    pool.set_mode("cached")
    yield pool
    pool.close()


def test_an_open_loop_far_above_capacity_keeps_the_driver_queue_and_ray_calls_bounded(
        null_pool: cluster.RayTarget) -> None:
    schedule = make_schedule(count=IMAGES, models=(f"null:{NULL_S}",), n_images=8, rate=RATE, seed=3)
    opts = DriverOptions(mode="cached", concurrency=None, max_group=1, depth=DEPTH, drain_timeout_s=30.0)
    peaks = {"queued": 0, "calls": 0, "backlog": -1}
    rss_before = host_memory_bytes()

    async def run() -> Any:
        handles = make_handles(null_pool.actors, null_pool.names, "cached", "actor", DEPTH)
        box: list[Driver] = []

        async def watch() -> None:  # samples the driver's counters on its own loop, every loop turn or so
            while True:
                if box:
                    d = box[0]
                    peaks["queued"] = max(peaks["queued"], sum(len(q) for q in d.pending))
                    peaks["calls"] = max(peaks["calls"], max(d.calls_inflight))
                    peaks["backlog"] = d.backlog
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        try:
            return await drive(schedule, handles, opts, balancer="least-outstanding", seed=0,
                               on_driver=lambda d: d is not None and box.append(d))
        finally:
            watcher.cancel()

    res = asyncio.run(run())
    rss_growth = host_memory_bytes() - rss_before

    assert peaks["backlog"] == 2 * DEPTH * 1
    assert 0 < peaks["calls"] <= DEPTH, peaks  # never more Ray calls in flight per worker than depth
    assert 0 < peaks["queued"] <= peaks["backlog"], peaks  # the driver's queue is bounded, not the schedule
    assert rss_growth < RSS_GROWTH_BOUND, rss_growth
    # every image accounted
    summary = summarize_mode("cached", res.ledger, histograms(res.ledger, 0), warmup=0, sent=res.sent,
                             not_sent=res.not_sent, retries=res.retries, cancelled=res.cancelled)["summary"]
    assert res.sent == IMAGES and res.not_sent == 0
    assert summary["images_sent"] == summary["ok"] + summary["failed"] == summary["rows"] == IMAGES
    assert summary["ok"] == IMAGES
    # the excess shows as lateness: nearly every image went out late, the last ones seconds late
    assert summary["late_share"] > 0.9, summary["late_share"]
    assert summary["late_p99_s"] > 0.5, summary["late_p99_s"]
    served_s = res.finished_s - res.started_s
    assert served_s > 1.0  # capacity, not the rate, set the pace (3,000 images at ~1,000/s at most)
