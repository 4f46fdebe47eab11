"""The engine's parameters: one frozen dataclass, built once in the supervisor, passed to every process.

Sources, later wins: preset < environment variables (the user's guide's names) < command line
(`--set NAME=VALUE` with the same names, and the dedicated flags). Two names for one knob
(GPU_AHEAD_LAYERS / group_prefetch_depth, CPU_CAP_VALUE / cpu_cache_layers) must agree when both
are given; a contradiction is an error, not a silent choice.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from ringllm.checkpoint.errors import RingllmError

# name -> (field, type); field None for pure aliases handled below
PARAMETERS = {
    "GPU_AHEAD_LAYERS": "gpu_ahead_layers",
    "GPU_MAX_GROUPS": "gpu_max_groups",
    "WSM_BALANCE_AHEAD": "balance_ahead",
    "WSM_PAIR_AHEAD": "pair_ahead",
    "WSM_H2D_GROUP_BACKLOG_MAX": "h2d_backlog_max",
    "CPU_CAP_VALUE": "cpu_cap",
    "CPU_RING_OFFSET": "cpu_ring_offset",
    "WSM_CPU_RING_MODE": "cpu_ring_mode",
    "WSM_CPU_CACHE_HWM_LAYERS": "cpu_hwm",
    "WSM_CPU_CACHE_LWM_LAYERS": "cpu_lwm",
    "WSM_CPU_BACK_MARGIN": "cpu_back_margin",
    "prefetch_distance": "prefetch_distance",
    "group_prefetch_depth": "gpu_ahead_layers",   # alias of GPU_AHEAD_LAYERS
    "max_cached_layers": "max_cached_layers",
    "cpu_cache_layers": "cpu_cap",                # alias of CPU_CAP_VALUE
    "warmup_layers": "warmup_layers",
    "GPU_RESIDENT_LAYERS": "gpu_resident_layers",  # ringllm's own: -1 = as many as fit
}

# The guide's presets: (GPU_AHEAD_LAYERS, GPU_MAX_GROUPS, CPU_CAP_VALUE, CPU_RING_OFFSET)
PRESETS = {
    "conservative": dict(gpu_ahead_layers=2, gpu_max_groups=7, cpu_cap=10, cpu_ring_offset=4),  # 24 GB GPU, 32 GB DRAM
    "balanced": dict(gpu_ahead_layers=4, gpu_max_groups=10, cpu_cap=12, cpu_ring_offset=4),     # 40 GB GPU, 64 GB DRAM
    "aggressive": dict(gpu_ahead_layers=6, gpu_max_groups=15, cpu_cap=20, cpu_ring_offset=6),   # 80 GB GPU, 128 GB DRAM
}


@dataclass(frozen=True)
class EngineConfig:
    gpu_ahead_layers: int = 4
    gpu_max_groups: int = 10
    balance_ahead: int = 4
    pair_ahead: int = 2
    h2d_backlog_max: int = 4
    cpu_cap: int = 12
    cpu_ring_offset: int = 4
    cpu_ring_mode: int = 1
    cpu_hwm: int = 15
    cpu_lwm: int = 9
    cpu_back_margin: int = 4
    prefetch_distance: int = 0
    max_cached_layers: int = 8
    warmup_layers: int = 0
    gpu_resident_layers: int = -1     # layers kept on the GPU for the whole run; -1 = auto (cuda: what fits)
    loaders: int = 2
    chunk_bytes: int = 16 << 20
    gpu_mem: int | None = None        # bytes the GPU process may allocate; None = no cap
    wait_timeout_s: float = 60.0      # longest any process waits on a peer before declaring it stuck

    @property
    def ring_slots(self) -> int:
        return self.cpu_cap

    @property
    def lookahead_layers(self) -> int:
        """Layers ahead of compute whose groups go to the GPU (whole-layer distance wins if set)."""
        return self.prefetch_distance or self.gpu_ahead_layers

    @property
    def group_budget(self) -> tuple[int, int]:
        """GPU group buffers (attn, ffn): GPU_MAX_GROUPS split evenly, capped by max_cached_layers."""
        total = min(self.gpu_max_groups, 2 * self.max_cached_layers)
        return (total + 1) // 2, total // 2

    def as_dict(self) -> dict:
        return asdict(self)


def _parse_int(name: str, value: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RingllmError(f"{name}={value!r} ({source}): must be an integer") from None


def build_config(preset: str | None = None, env: dict | None = None, overrides: dict | None = None,
                 preset_values: dict | None = None, **flags) -> EngineConfig:
    """preset (or preset_values, from --preset auto) < env (user's names) < overrides (user's
    names, from --set) < flags (field names)."""
    values: dict = {}
    given: dict[str, tuple[str, int, str]] = {}   # field -> (name, value, source) for alias checks
    if preset is not None:
        if preset not in PRESETS:
            raise RingllmError(f"--preset {preset!r}: one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(preset_values or {})

    def apply(source: str, mapping: dict, layer_given: dict):
        for name, raw in mapping.items():
            fld = PARAMETERS.get(name)
            if fld is None:
                raise RingllmError(f"unknown parameter {name} ({source}); known: {', '.join(PARAMETERS)}")
            value = _parse_int(name, str(raw), source)
            if fld in layer_given and layer_given[fld][1] != value:
                other = layer_given[fld]
                raise RingllmError(
                    f"{other[0]}={other[1]} and {name}={value} ({source}) set the same knob to different values")
            layer_given[fld] = (name, value, source)
            values[fld] = value

    env_given: dict = {}
    apply("environment", {k: v for k, v in (env or {}).items() if k in PARAMETERS}, env_given)
    set_given: dict = {}
    apply("--set", overrides or {}, set_given)
    given.update(env_given)
    given.update(set_given)
    for key, value in flags.items():
        if value is not None:
            values[key] = value

    # Derived defaults follow the knobs they derive from, unless set explicitly.
    ahead = values.get("gpu_ahead_layers", EngineConfig.gpu_ahead_layers)
    cap = values.get("cpu_cap", EngineConfig.cpu_cap)
    values.setdefault("balance_ahead", ahead)
    values.setdefault("gpu_max_groups", max(10, 2 + 2 * ahead + 1))
    values.setdefault("cpu_hwm", cap + 3)
    values.setdefault("cpu_lwm", max(0, cap - 3))
    cfg = EngineConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: EngineConfig) -> None:
    def need(ok: bool, text: str):
        if not ok:
            raise RingllmError(text)

    need(cfg.gpu_ahead_layers >= 1, f"GPU_AHEAD_LAYERS={cfg.gpu_ahead_layers}: must be >= 1")
    need(cfg.gpu_max_groups >= 2, f"GPU_MAX_GROUPS={cfg.gpu_max_groups}: must be >= 2 (one attn and one ffn buffer)")
    need(cfg.max_cached_layers >= 1, f"max_cached_layers={cfg.max_cached_layers}: must be >= 1")
    need(cfg.balance_ahead >= 1, f"WSM_BALANCE_AHEAD={cfg.balance_ahead}: must be >= 1")
    need(cfg.pair_ahead >= 0, f"WSM_PAIR_AHEAD={cfg.pair_ahead}: must be >= 0")
    need(cfg.h2d_backlog_max >= 1, f"WSM_H2D_GROUP_BACKLOG_MAX={cfg.h2d_backlog_max}: must be >= 1")
    need(cfg.cpu_cap >= 1, f"CPU_CAP_VALUE={cfg.cpu_cap}: must be >= 1")
    need(cfg.cpu_cap >= cfg.lookahead_layers,
         f"CPU_CAP_VALUE={cfg.cpu_cap} is smaller than the GPU look-ahead of {cfg.lookahead_layers} layers "
         "(GPU_AHEAD_LAYERS / prefetch_distance): the ring could never hold what the GPU asks for")
    need(cfg.cpu_ring_offset >= 0, f"CPU_RING_OFFSET={cfg.cpu_ring_offset}: must be >= 0")
    need(cfg.cpu_ring_mode in (0, 1), f"WSM_CPU_RING_MODE={cfg.cpu_ring_mode}: must be 0 or 1")
    need(cfg.cpu_lwm >= 0, f"WSM_CPU_CACHE_LWM_LAYERS={cfg.cpu_lwm}: must be >= 0")
    need(cfg.cpu_lwm < cfg.cpu_hwm,
         f"WSM_CPU_CACHE_LWM_LAYERS={cfg.cpu_lwm} must be below WSM_CPU_CACHE_HWM_LAYERS={cfg.cpu_hwm}")
    need(cfg.cpu_back_margin >= 0, f"WSM_CPU_BACK_MARGIN={cfg.cpu_back_margin}: must be >= 0")
    need(cfg.prefetch_distance >= 0, f"prefetch_distance={cfg.prefetch_distance}: must be >= 0")
    need(cfg.warmup_layers >= 0, f"warmup_layers={cfg.warmup_layers}: must be >= 0")
    need(cfg.gpu_resident_layers >= -1, f"GPU_RESIDENT_LAYERS={cfg.gpu_resident_layers}: must be >= 0, or -1 for auto")
    need(cfg.loaders >= 1, f"--loaders {cfg.loaders}: at least one loader is needed")
    need(cfg.loaders <= 64, f"--loaders {cfg.loaders}: at most 64")
    need(cfg.chunk_bytes >= 4096, f"chunk size {cfg.chunk_bytes}: must be >= 4096")


def env_parameters() -> dict:
    """The user's parameter names found in the environment (read once, at start-up)."""
    return {k: v for k, v in os.environ.items() if k in PARAMETERS}


FIELD_NAMES = [f.name for f in fields(EngineConfig)]


def _is_rotational(path) -> bool:
    """True when the file system holding `path` sits on a spinning disk (per /sys/block)."""
    try:
        dev = os.stat(path).st_dev
        sys_dev = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        real = os.path.realpath(sys_dev)
        for candidate in (real, os.path.dirname(real)):   # a partition's queue/ is on its parent
            flag = os.path.join(candidate, "queue", "rotational")
            if os.path.exists(flag):
                with open(flag) as f:
                    return f.read().strip() == "1"
    except OSError:
        pass
    return False


def default_loader_count(model_dir) -> int:
    """One loader for a spinning disk; for SSDs, enough parallel reads to fill NVMe queues,
    bounded by the cores (each loader is a mostly-sleeping process). Virtual disks (virtio,
    Xen) call themselves rotational whatever backs them, so they count as SSDs."""
    if _is_rotational(model_dir) and not _is_virtual_disk(model_dir):
        return 1
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def _is_virtual_disk(path) -> bool:
    try:
        dev = os.stat(path).st_dev
        real = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return False
    name = os.path.basename(real.rstrip("/"))
    return "virtio" in real or name.startswith(("vd", "xvd"))


def parse_bytes(text: str) -> int:
    """'24GiB', '24G', '512MiB', '1e9' -> bytes (binary units for G/M/K, as GPUs report them)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    s = text.strip().lower()
    num = s.rstrip("kmgtib")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise RingllmError(f"cannot read {text!r} as a size (examples: 24GiB, 512MiB, 8000000000)") from None
    if value <= 0:
        raise RingllmError(f"size {text!r} must be positive")
    return int(value)
