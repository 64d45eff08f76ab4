"""The meaning checks of a ``Config``: ranges and cross-field rules, once ``config`` has the types right.

Each failure is a ``ConfigError`` that names its key and what it must be (and, for a name, the nearest
valid one).  Plain Python; the parsers of modes, arrivals, popularity, peak and sweep settings are their
own modules' (``residency``, ``schedule``, ``peak_search``, ``sweep``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cortexbench.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from cortexbench.config import Config


def check_semantics(cfg: Config) -> None:
    """Range and cross-field checks, after the types are right (``config.load_config``); ConfigError names
    the key."""
    from cortexbench.models.registry import expand_model_names

    expand_model_names(cfg.models, key="models", known_only=cfg.stream.target is None)  # a server names its own
    _positive(cfg.times, "times")
    if isinstance(cfg.gpu_num, int) and cfg.gpu_num < 0:
        raise ConfigError(f"'gpu_num' must be 'auto' or 0 or more, not {cfg.gpu_num}")
    if not cfg.batchsize:
        raise ConfigError("'batchsize' must name at least one batch size")
    for b in cfg.batchsize:
        _positive(b, "batchsize")
    s = cfg.single
    _positive(s.min_runs, "single.min_runs")
    if s.warmup_runs < 0:
        raise ConfigError(f"'single.warmup_runs' must be 0 or more, not {s.warmup_runs}")
    if s.max_seconds <= 0:
        raise ConfigError(f"'single.max_seconds' must be more than 0, not {s.max_seconds}")
    if not 0 < s.target_rel_spread < 1:
        raise ConfigError(f"'single.target_rel_spread' must be between 0 and 1, not {s.target_rel_spread}")
    for d in s.devices:
        if d != "auto" and d != "cpu" and not (d.startswith("gpu:") and d[4:].isdigit()):
            raise ConfigError(f"'single.devices': '{d}' is not a device{did_you_mean(d, ['auto', 'cpu', 'gpu:0'])}")
    _positive(s.fidelity_images, "single.fidelity_images")
    if not s.precisions:
        raise ConfigError("'single.precisions' must name at least one precision (fp32, fp16, bf16, int8)")
    if s.labels is not None and not s.engines:
        raise ConfigError("'single.labels' takes effect with 'single.engines' (--engines eager,ort,...)")
    if s.precisions != ("fp32",) and not s.engines:
        raise ConfigError("'single.precisions' takes effect with 'single.engines' (--engines eager,ort,...); "
                          "without engines 'precision' sets the backend's precision")
    st = cfg.stream
    from cortexbench.residency import parse_mode
    from cortexbench.schedule import parse_arrivals, parse_popularity

    if not st.modes:
        raise ConfigError("'stream.modes' must name at least one mode (cached, swap, cold, lru:K)")
    for m in st.modes:
        parse_mode(m, key="stream.modes")
    parse_popularity(st.popularity, key="stream.popularity")
    arrivals = parse_arrivals(st.arrivals, key="stream.arrivals")
    if arrivals.kind != "poisson" and st.rate is None and not st.sweep.strip().lower().startswith("rate:"):
        raise ConfigError(f"'stream.arrivals' {arrivals} is an open loop: give its mean rate with 'stream.rate' "
                          "(--rate) too")
    _positive(st.concurrency, "stream.concurrency")
    if st.rate is not None and st.rate <= 0:
        raise ConfigError(f"'stream.rate' must be more than 0 images/s, not {st.rate}")
    if st.duration_s is not None and st.duration_s <= 0:
        raise ConfigError(f"'stream.duration_s' must be more than 0 seconds, not {st.duration_s}")
    for name in ("warmup", "cpu_workers", "drivers", "lanes", "retries", "max_group", "on_demand_images"):
        if getattr(st, name) < 0:
            raise ConfigError(f"'stream.{name}' must be 0 or more, not {getattr(st, name)}")
    _positive(st.image_pool, "stream.image_pool")
    if st.image_timeout_s <= 0:
        raise ConfigError(f"'stream.image_timeout_s' must be more than 0 seconds, not {st.image_timeout_s}")
    if not 0 <= st.metrics_port <= 65535:
        raise ConfigError(f"'stream.metrics_port' must be a port number (0 to 65535; 0 turns metrics off), not {st.metrics_port}")
    for name in ("linger_s", "drain_timeout_s"):
        if getattr(st, name) < 0:
            raise ConfigError(f"'stream.{name}' must be 0 or more seconds, not {getattr(st, name)}")
    from cortexbench.peak_search import check_peak_config

    check_peak_config(st)
    if st.gpu_hour_cost is not None and not st.gpu_hour_cost > 0:
        raise ConfigError(f"'stream.gpu_hour_cost' must be more than 0, not {st.gpu_hour_cost}")
    from cortexbench.sweep import check_sweep_config

    check_sweep_config(st)
    if st.model_weights and any(w < 0 for w in st.model_weights):
        raise ConfigError("'stream.model_weights' must be 0 or more each")
    _positive(cfg.images.synth_count, "images.synth_count")
    sv = cfg.serve
    parse_mode(sv.mode, key="serve.mode")
    if not 0 <= sv.port <= 65535:
        raise ConfigError(f"'serve.port' must be a port number (0 to 65535; 0 = any free port), not {sv.port}")
    for name in ("max_inflight", "max_body_bytes", "retry_after_s"):
        _positive(getattr(sv, name), f"serve.{name}")
    if sv.call_timeout_s <= 0:
        raise ConfigError(f"'serve.call_timeout_s' must be more than 0 seconds, not {sv.call_timeout_s}")
    if sv.drain_timeout_s < 0:
        raise ConfigError(f"'serve.drain_timeout_s' must be 0 or more seconds, not {sv.drain_timeout_s}")


def _positive(v: float, key: str) -> None:
    if v <= 0:
        raise ConfigError(f"'{key}' must be 1 or more, not {v}")
