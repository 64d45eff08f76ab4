"""``--sweep concurrency:1,4,16`` and ``--sweep rate:50,100,200`` on the stream's workers.

``LoadSweepRun`` is a ``coordinator.StreamRun`` whose passes are ``sweep.pass_name``'s (``cached@c4``,
``cached@r100``): each is a mode of ``stream.modes`` run on the base plan at one concurrency (a closed
loop) or one rate (an open loop, arrivals as ``--arrivals`` says), through ``StreamRun.run_mode``; its
figures are kept under the pass's name.  Every pass replays the same seeded stream: the same models and
images in the same order; a rate scales the arrival times.  The run's plan (results.json's ``run``) is
the last pass's; ``sweep`` in results.json holds each pass's figures (``sweep.load_table``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cortexbench.coordinator import StreamPlan, StreamRun, call_depth
from cortexbench.schedule import make_schedule
from cortexbench.sweep import parse_sweep, split_pass


def plan_at(base: StreamPlan, kind: str, value: float) -> StreamPlan:
    """``base`` at concurrency ``value`` (closed loop) or rate ``value`` (open loop); passes unchanged."""
    st = base.cfg.stream
    rate = float(value) if kind == "rate" else None
    conc = int(value) if kind == "concurrency" else st.concurrency
    cfg = replace(base.cfg, stream=replace(st, rate=rate, concurrency=conc))
    sched = make_schedule(count=cfg.times, models=base.models, n_images=len(base.images), popularity=st.popularity,
                          weights=st.model_weights, rate=rate, duration_s=st.duration_s, warmup=st.warmup,
                          seed=cfg.seed, arrivals=st.arrivals if rate is not None else "poisson")
    return replace(base, cfg=cfg, schedule=sched, depth=call_depth(base.dispatch, rate, conc, base.max_group))


class LoadSweepRun(StreamRun):
    """A StreamRun whose passes are a mode at one concurrency or rate each; ``modes`` is keyed by pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base = self.plan
        self.kind = parse_sweep(self.plan.cfg.stream.sweep).kind

    async def run_passes(self) -> None:
        for name in self.base.run_modes:
            if self.interrupted or self.error:
                break
            mode, value = split_pass(name)
            if value is None:
                raise ValueError(f"{name} is not a pass of a {self.kind} sweep")
            self.plan = plan_at(self.base, self.kind, value)
            await self.run_mode(mode)
            if mode in self.modes:  # not when stopped while the workers were set up
                run = self.modes.pop(mode)
                run.summary["summary"]["mode"] = name
                self.modes[name] = run
                self.setup_s[name] = self.setup_s.pop(mode, [])
