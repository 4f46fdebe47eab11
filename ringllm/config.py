"""The engine's parameters: one frozen dataclass, built once in the supervisor, passed to every process.

Sources, later wins: preset < environment variables (the user's guide's names) < command line
(`--set NAME=VALUE` with the same names, and the dedicated flags). Two names for one knob
(GPU_AHEAD_LAYERS / group_prefetch_depth, CPU_CAP_VALUE / cpu_cache_layers) must agree when both
are given; a contradiction is an error, not a silent choice.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from ringllm.checkpoint.errors import RingllmError
from ringllm.shm.slot_plan import DEFAULT_CHUNK_BYTES, MERGE_GAP

GIB = 2 ** 30
MAX_LOADERS = 64
# DRAM kept free beyond the ring: the OS and its page cache, and the run's own processes (the GPU
# process holds the CUDA context and, on cuda, the embedding table: 2 GiB for a 70B). The ring is
# pinned on cuda, so this errs on the generous side. One value for the pre-run check
# (supervisor.checks.check_dram) and for choosing a ring (--preset auto, the default ring), so that a
# ring ringllm chooses always passes the check.
DRAM_HEADROOM = 4 * GIB
# a tensor-parallel rank past the first, beside the ring: its torch, CUDA context and buffers
RANK_PROCESS_BYTES = 2 * GIB


def dram_headroom(layout=None, world: int = 1) -> int:
    """DRAM kept free beside the ring: DRAM_HEADROOM for the run's processes and the system, plus,
    for each tensor-parallel rank past the first, its own host copy of the (unsplit) embedding
    table and its process (RANK_PROCESS_BYTES)."""
    if world <= 1 or layout is None:
        return DRAM_HEADROOM
    return DRAM_HEADROOM + (world - 1) * (layout.embed.nbytes + RANK_PROCESS_BYTES)


def headroom_text(headroom: int) -> str:
    return f"available minus {round(headroom / GIB, 1):g} GiB"
# EngineConfig.fp8_matmul's values (workers.quantized implements them; config imports no torch)
FP8_MATMUL_WAYS = ("auto", "dequant", "scaled_mm")

# name -> (field, type); field None for pure aliases handled below
PARAMETERS = {
    "GPU_AHEAD_LAYERS": "gpu_ahead_layers",
    "GPU_MAX_GROUPS": "gpu_max_groups",
    "WSM_BALANCE_AHEAD": "balance_ahead",
    "WSM_PAIR_AHEAD": "pair_ahead",
    "WSM_H2D_GROUP_BACKLOG_MAX": "h2d_backlog_max",
    "CPU_CAP_VALUE": "cpu_cap",
    "CPU_PINNED_LAYERS": "cpu_pinned_layers",     # ringllm's own: streamed layers that never leave the ring
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
# What a preset counts in layers and groups (the look-ahead, the GPU group buffers, the ring and
# its offset) it counts in 16-bit layers: its GPU and DRAM class hold that many of a bf16 70B's.
PRESET_COUNTS = ("gpu_ahead_layers", "gpu_max_groups", "cpu_cap", "cpu_ring_offset")


def weight_scale(layout) -> int:
    """Layers of this checkpoint in the bytes of one 16-bit layer: 2 for FP8 weights, else 1."""
    return 2 if layout.quantized else 1


def preset_values_for(preset: str, scale: int) -> dict:
    """The guide's preset for layers `scale` times smaller than 16-bit ones: its counts times
    `scale`, so that the look-ahead covers the same copy time (the compute of the GPU-resident
    layers at a pass's start, FP8 having halved each copy: 0.56 of bf16's s/token at the
    preset's 2 FP8 layers against 0.50 of its bytes, on an H200) in the same GPU and DRAM bytes."""
    if preset not in PRESETS:
        raise RingllmError(f"--preset {preset!r}: one of {', '.join(PRESETS)}")
    values = {k: v * scale if k in PRESET_COUNTS else v for k, v in PRESETS[preset].items()}
    return with_layer_cache_for_groups(values, scale)


def with_layer_cache_for_groups(values: dict, scale: int) -> dict:
    """`values` (a preset's, or --preset auto's) for layers `scale` times smaller than 16-bit ones,
    with max_cached_layers grown to their GPU_MAX_GROUPS when scale > 1: the GPU layer cache must
    not cap the multiplied group buffers (EngineConfig.group_budget). At scale 1 the default stays."""
    if scale > 1:
        return {**values, "max_cached_layers": max(EngineConfig.max_cached_layers, values["gpu_max_groups"])}
    return values


@dataclass(frozen=True)
class EngineConfig:
    gpu_ahead_layers: int = 4
    gpu_max_groups: int = 10
    balance_ahead: int = 4
    pair_ahead: int = 2
    h2d_backlog_max: int = 4
    cpu_cap: int = 12
    cpu_pinned_layers: int = 0        # CPU_PINNED_LAYERS: streamed layers that stay in their ring slots (tiers)
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
    gpu_mem: int | None = None        # bytes the GPU process may allocate; None = no cap
    dram_limit: int | None = None     # --dram-limit: DRAM for the ring and the weight warmer's page cache together
    # how an FP8 Linear is computed (workers.quantized.choose_fp8_matmul): "dequant" (to the compute
    # dtype, then matmul), "scaled_mm" (torch._scaled_mm, fp8 x fp8: CUDA sm_89+, bf16), "auto"
    # (scaled_mm where it can run, else dequant). A field only: --set takes integers.
    fp8_matmul: str = "auto"
    # ringllm's own mechanics (no guide name; tests and benchmarks set them as fields)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES   # a read job: K loaders share one layer in pieces this big
    dispatch_depth: int = 2           # read jobs queued at each loader at once
    merge_gap: int = MERGE_GAP        # tensors of a layer closer than this in one shard are read in one go
    wait_timeout_s: float = 60.0      # longest any process waits on a peer before declaring it stuck
    startup_timeout_s: float = 300.0  # longest the supervisor waits for the GPU process to be ready
    # Stopping the children (supervisor._stop): one budget from the Shutdown message to SIGKILL.
    # SIGKILL must not land while the GPU process unpins the ring (cudaHostUnregister; SIGTERM is
    # harmless there: Python runs its handler after the call returns). Pinning took 8.8-9.8 s for
    # a 19.1 GiB ring on an H200 host, page faults included (register_seconds in
    # docs/bench/h200-*.json), about 0.5 s/GiB. Unpinning only drops page references and IOMMU
    # mappings, several times faster; we allow half the pinning rate, so a 100 GiB ring gets
    # 5 + 25 s. The wait ends as soon as the processes are gone: the margin costs nothing.
    stop_grace_s: float = 2.0         # children read their queues at least every 0.5 s; then SIGTERM
    stop_base_s: float = 5.0          # the whole budget when no memory is registered with CUDA
    unpin_s_per_gib: float = 0.25
    reap_after_kill_s: float = 2.0    # SIGKILLed processes are gone within this, unless stuck in the kernel

    @property
    def ring_slots(self) -> int:
        return self.cpu_cap

    @property
    def disk_slots(self) -> int:
        """Ring slots of the disk-fed part: the window that slides (CPU_CAP_VALUE - CPU_PINNED_LAYERS)."""
        return self.cpu_cap - self.cpu_pinned_layers

    # --- derived values: the streaming code uses these, never the raw knobs they come from ----------
    def stop_budget_s(self, registered_bytes: int) -> float:
        """Seconds from the Shutdown message to SIGKILL for a run that registered this much memory."""
        return self.stop_base_s + self.unpin_s_per_gib * registered_bytes / GIB

    @property
    def lookahead_layers(self) -> int:
        """Streamed layers ahead of compute the GPU process asks the ring for (whole-layer distance
        wins if set)."""
        return self.prefetch_distance or self.gpu_ahead_layers

    @property
    def copy_ahead(self) -> int:
        """Streamed layers ahead of compute whose groups may be copied to the GPU: WSM_BALANCE_AHEAD,
        but never past the look-ahead (a layer not asked of the ring is never offered to copy)."""
        return min(self.balance_ahead, self.lookahead_layers)

    @property
    def group_budget(self) -> tuple[int, int]:
        """GPU group buffers (attn, ffn): GPU_MAX_GROUPS split evenly, capped by max_cached_layers."""
        total = min(self.gpu_max_groups, 2 * self.max_cached_layers)
        return (total + 1) // 2, total // 2

    def warmup_layers_for(self, streamed_layers: int) -> int:
        """The streamed layers the warm-up waits for before the first token: warmup_layers, but no
        more than the copies issued before compute starts (copy_ahead layers), than the layers that
        stream, or than the group buffers hold (one attn + one ffn per layer). Waiting for more
        could never finish."""
        return max(0, min(self.warmup_layers, self.copy_ahead, streamed_layers, self.group_budget[1]))

    def as_dict(self) -> dict:
        return asdict(self)


def _parse_int(name: str, value: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RingllmError(f"{name}={value!r} ({source}): must be an integer") from None


# where a value came from; the first two are the user's own choices
FROM_ENV, FROM_SET = "environment", "--set"


@dataclass(frozen=True)
class ResolvedConfig:
    engine: EngineConfig
    origin: dict          # field -> "environment NAME" | "--set NAME" | "--preset X" | label | "flag"
    notes: tuple          # one line per value lowered to what can take effect

    def user_set(self, fld: str) -> str | None:
        """'--set NAME' / 'environment NAME' when the user chose this field, else None."""
        origin = self.origin.get(fld, "")
        return origin if origin.startswith((FROM_ENV, FROM_SET)) else None


def build_config(preset: str | None = None, env: dict | None = None, overrides: dict | None = None,
                 preset_values: dict | None = None, **flags) -> EngineConfig:
    """preset (or preset_values, from --preset auto) < env (user's names) < overrides (user's
    names, from --set) < flags (field names)."""
    return resolve_config(preset, env, overrides, preset_values, **flags).engine


def resolve_config(preset: str | None = None, env: dict | None = None, overrides: dict | None = None,
                   preset_values: dict | None = None, preset_label: str = "--preset auto",
                   streamed_layers: int | None = None, check: bool = True, **flags) -> ResolvedConfig:
    """build_config, plus where each value came from and the values lowered to what can take
    effect (one note each). streamed_layers, when known (layers minus GPU-resident ones), caps
    the ring: a slot per streamed layer is all a ring can ever use. check=False skips validation
    (a first pass that only wants to know what the settings are)."""
    values: dict = {}
    origin: dict[str, str] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise RingllmError(f"--preset {preset!r}: one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        origin.update(dict.fromkeys(PRESETS[preset], f"--preset {preset}"))
    values.update(preset_values or {})
    origin.update(dict.fromkeys(preset_values or {}, preset_label))

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
            origin[fld] = f"{source} {name}"

    apply(FROM_ENV, {k: v for k, v in (env or {}).items() if k in PARAMETERS}, {})
    apply(FROM_SET, overrides or {}, {})
    for key, value in flags.items():
        if value is not None:
            values[key] = value
            origin[key] = "flag"

    notes: list[str] = []

    def lower(fld: str, name: str, to: int, why: str):
        if fld in origin:             # a built-in default is lowered without a word: nobody chose it
            notes.append(f"{name}={values[fld]} ({origin[fld]}) {why}; using {name}={to}")
        values[fld] = to

    # Derived defaults follow the knobs they derive from, unless set explicitly; a value set
    # beyond what can take effect is lowered to it, with one line (see README: the cap rule).
    ahead = values.get("gpu_ahead_layers", EngineConfig.gpu_ahead_layers)
    lookahead = values.get("prefetch_distance", EngineConfig.prefetch_distance) or ahead
    if lookahead >= 1 and values.get("balance_ahead", 0) > lookahead:
        lower("balance_ahead", "WSM_BALANCE_AHEAD", lookahead,
              f"is beyond the look-ahead of {lookahead} layers (GPU_AHEAD_LAYERS / prefetch_distance), "
              "and no copy can run ahead of what the ring is asked for")
    values.setdefault("balance_ahead", lookahead)
    values.setdefault("cpu_ring_offset", lookahead)
    values.setdefault("gpu_max_groups", max(10, 2 + 2 * ahead + 1))
    if streamed_layers is not None and values.get("cpu_cap", EngineConfig.cpu_cap) > max(1, streamed_layers):
        lower("cpu_cap", "CPU_CAP_VALUE", max(1, streamed_layers),
              f"is more than the {streamed_layers} layers that stream (GPU-resident layers need no slot), "
              "and a slot per streamed layer is all a ring can use")
    cap = values.get("cpu_cap", EngineConfig.cpu_cap)
    if streamed_layers is not None and values.get("cpu_pinned_layers", 0) > max(0, streamed_layers):
        lower("cpu_pinned_layers", "CPU_PINNED_LAYERS", max(0, streamed_layers),
              f"is more than the {streamed_layers} layers that stream (GPU-resident layers need no slot)")
    # the water marks count the disk part's layers (pinned ones are never evicted)
    disk = cap - values.get("cpu_pinned_layers", 0)
    values.setdefault("cpu_hwm", disk + 3)
    values.setdefault("cpu_lwm", max(0, disk - 3))
    cfg = EngineConfig(**values)
    if not check:
        return ResolvedConfig(cfg, origin, tuple(notes))
    validate(cfg, streamed_layers)
    # the streamed count bounds the warm-up too, but only the GPU process knows it for sure
    reach = cfg.warmup_layers_for(cfg.warmup_layers if streamed_layers is None else streamed_layers)
    if reach < cfg.warmup_layers:
        lower("warmup_layers", "warmup_layers", reach,
              f"is more than can be copied before the first token (copy look-ahead {cfg.copy_ahead} layers, "
              f"group buffers for {cfg.group_budget[1]}"
              + (f", {streamed_layers} streamed layers" if streamed_layers is not None else "") + ")")
        cfg = replace(cfg, warmup_layers=reach)
    return ResolvedConfig(cfg, origin, tuple(notes))


def validate(cfg: EngineConfig, streamed_layers: int | None = None) -> None:
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
    # a ring that holds every streamed layer never runs short, whatever the look-ahead
    need(cfg.cpu_cap >= min(cfg.lookahead_layers, cfg.lookahead_layers if streamed_layers is None else streamed_layers),
         f"CPU_CAP_VALUE={cfg.cpu_cap} is smaller than the GPU look-ahead of {cfg.lookahead_layers} layers "
         "(GPU_AHEAD_LAYERS / prefetch_distance): the ring could never hold what the GPU asks for")
    need(cfg.cpu_pinned_layers >= 0, f"CPU_PINNED_LAYERS={cfg.cpu_pinned_layers}: must be >= 0")
    holds_all = streamed_layers is not None and cfg.cpu_cap >= streamed_layers
    need(cfg.cpu_pinned_layers < cfg.cpu_cap or (holds_all and cfg.cpu_pinned_layers <= cfg.cpu_cap),
         f"CPU_PINNED_LAYERS={cfg.cpu_pinned_layers} must be below CPU_CAP_VALUE={cfg.cpu_cap}: the layers "
         "that are not pinned need slots to stream through (unless the ring holds every streamed layer)")
    # as for the whole ring above: the disk part must hold the look-ahead, unless it holds every disk layer
    disk_layers = None if streamed_layers is None else streamed_layers - cfg.cpu_pinned_layers
    need(cfg.cpu_pinned_layers == 0 or cfg.disk_slots >= min(cfg.lookahead_layers, cfg.lookahead_layers
                                                              if disk_layers is None else disk_layers),
         f"CPU_CAP_VALUE={cfg.cpu_cap} - CPU_PINNED_LAYERS={cfg.cpu_pinned_layers} leaves {cfg.disk_slots} slot(s) "
         f"for the disk-fed layers, fewer than the GPU look-ahead of {cfg.lookahead_layers} layers "
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
    need(cfg.loaders <= MAX_LOADERS, f"--loaders {cfg.loaders}: at most {MAX_LOADERS}")
    need(cfg.chunk_bytes >= 4096, f"chunk size {cfg.chunk_bytes}: must be >= 4096")
    need(cfg.dispatch_depth >= 1, f"dispatch depth {cfg.dispatch_depth}: must be >= 1")
    need(cfg.merge_gap >= 0, f"merge gap {cfg.merge_gap}: must be >= 0")
    need(cfg.wait_timeout_s > 0 and cfg.startup_timeout_s > 0, "timeouts must be positive")
    need(cfg.fp8_matmul in FP8_MATMUL_WAYS,
         f"fp8_matmul={cfg.fp8_matmul!r}: must be one of {', '.join(FP8_MATMUL_WAYS)}")


def env_parameters() -> dict:
    """The user's parameter names found in the environment (read once, at start-up)."""
    return {k: v for k, v in os.environ.items() if k in PARAMETERS}




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
