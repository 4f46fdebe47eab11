"""GPU process: the only process that touches CUDA. Maps the ring, says which layers stay on the
GPU (the coordinator may already be loading on the supervisor's estimate), registers the ring
with CUDA slot by slot as the loaders fill it (workers.registrar), loads the GPU-resident
weights and warms the kernels up while the disk fills the ring, then runs the request engine
(workers.engine) over a StreamingSource in the request loop (workers.request_loop), for a
generate run's prompts or serve's requests alike."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace

from ringllm.checkpoint.errors import RingllmError
from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import Channel, Fatal, Mark, Ready, ResidentLayers
from ringllm.shm.ring import Ring
from ringllm.shm.stats import StatsPage
from ringllm.workers.process_setup import apply_torch_threads, child_start, sigterm_deferred, stop_requested
from ringllm.workers.registrar import SlotRegistrar

log = logging.getLogger("ringllm.gpu")


@dataclass(frozen=True)
class GpuArgs:
    parent_pid: int
    ring_name: str
    inbox: str
    coord_queue: str
    sup_queue: str
    layout: object          # ModelLayout
    plans: tuple            # LayerPlan per layer
    engine: object          # EngineConfig
    device: str
    dtype: str              # "bfloat16" | "float16" | "float32"
    prompts: tuple          # token ids per row
    max_new_tokens: int
    sampling: object        # SamplingParams
    eos_ids: tuple
    verbose: bool = False
    faults: FaultPlan = NO_FAULTS  # tests only (a random delay before serving each group)
    profile_trace: str | None = None   # write a Chrome trace (torch.profiler) of the generation here
    fill_ring_first: bool = False  # bench: wait until the ring holds what it can before timing starts
    stats_name: str = ""           # the run's stats page (shm.stats)
    # `ringllm serve`: (max_batch, max_context); prompts are empty and requests come as messages
    serve: tuple | None = None
    # the supervisor's WeightWarmer read the head (embeddings, norm, lm_head) and layers below
    # this into the page cache (-1: nothing warmed): those are read buffered, not O_DIRECT
    warmed_layers: int = -1
    # tensor parallel (workers.tensor_parallel): this process is rank `rank` of `world`, each rank
    # copying and computing its share of every layer (checkpoint.sharding) out of the one shared
    # ring; the ranks meet through torch.distributed at dist_addr:dist_port (rank 0 hosts the store)
    rank: int = 0
    world: int = 1
    dist_addr: str = "127.0.0.1"
    dist_port: int = 0
    dist_backend: str = "gloo"    # "nccl" between GPUs (supervisor.parallel.TensorParallelPlan.backend_for)
    device_sharers: int = 1       # ranks on this GPU (--devices 0,0 over gloo): they split its free memory


def planned_shape(args: GpuArgs) -> tuple[int, int, int]:
    """(rows, slots per row, prompt chunk) of the engine, which the memory plan and the warm-up
    assume: the prompts of a generate run, or serve's max_batch rows of max_context slots."""
    from ringllm.workers.memory_plan import PREFILL_CHUNK
    from ringllm.workers.speculation import cache_slots

    if args.serve is not None:
        max_batch, max_context = args.serve
        return max_batch, max_context, min(max_context - 1, 16)
    longest = max(len(p) for p in args.prompts)
    # the same sequence length and speculation as every other planner call (ringllm.generate);
    # a draft's room past the new tokens only where the model's context allows it
    slots = min(cache_slots(longest, args.max_new_tokens, args.sampling), args.layout.config.max_position_embeddings)
    return len(args.prompts), slots, min(longest, PREFILL_CHUNK)


def planned_passes(args: GpuArgs) -> int | None:
    """The most passes a generate run takes (None: serve, no end): its prompts' prefill (a shared
    budget of PREFILL_CHUNK tokens a pass) gives each its first token, then one pass per further
    token. An EOS or accepted drafts end it sooner. The scheduler copies nothing past it."""
    from ringllm.workers.memory_plan import PREFILL_CHUNK

    if args.serve is not None:
        return None
    return -(-sum(map(len, args.prompts)) // PREFILL_CHUNK) + args.max_new_tokens - 1


def resident_layer_count(args: GpuArgs, device_type: str, free_bytes: int | None) -> int:
    """GPU_RESIDENT_LAYERS, or with -1 (auto) as many layers as fit (memory_plan.planned_resident_layers)."""
    from ringllm.workers.memory_plan import planned_resident_layers, serve_pass_tokens
    from ringllm.workers.spec_plan import spec_plan

    batch, max_seq, _ = planned_shape(args)
    pass_tokens = serve_pass_tokens(*args.serve) if args.serve is not None else None
    keep = planned_resident_layers(args.layout, args.engine, batch, max_seq, args.dtype,
                                   device_type, free_bytes, spec=spec_plan(args.sampling), pass_tokens=pass_tokens)
    return keep or 0


def wait_for_ring(ring: Ring, slots: int, timeout_s: float) -> None:
    """Block until `slots` ring slots are READY (the bench times a warm ring)."""
    from ringllm.shm.ring import READY

    # a big ring takes a while from disk: allow 100 MB/s at the least
    deadline = time.monotonic() + max(timeout_s, ring.nbytes / 100e6)
    while sum(ring.read_slot(s)[0] == READY for s in range(ring.slot_count)) < slots:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ring did not fill {slots} slots in time")
        time.sleep(0.05)


def gpu_main(args: GpuArgs) -> None:
    child_start(f"ringllm-gpu{args.rank or ''}", args.parent_pid, args.verbose)   # ranks 1..: ringllm-gpu1, ...
    with sigterm_deferred():      # a SystemExit inside torch's import would abort, loudly
        import torch

        torch_threads = apply_torch_threads(torch, args.world)   # before torch runs anything in parallel
    gpu = GpuProcess(args, torch_threads)
    try:
        gpu.open_device()
        gpu.plan_resident_layers()
        gpu.load_and_warm_up()
        gpu.start_streaming()
        gpu.run_requests()
    except SystemExit:
        raise
    except BaseException as err:  # report, then exit non-zero: the supervisor ends the run
        gpu.report_fatal(err)
        raise SystemExit(1)
    finally:
        gpu.close()


class GpuProcess:
    """The GPU process's steps, in the order gpu_main runs them. Each start-up phase is timed
    (`phases`: name -> (start, end) on time.monotonic(), one clock for every process of the run)."""

    def __init__(self, args: GpuArgs, torch_threads: int):
        import torch

        from ringllm.workers.request_loop import RequestTap
        from ringllm.workers.streaming import InboxReader

        self.args, self.torch = args, torch
        self.t0 = time.monotonic()
        self.phases = {"spawn": (None, self.t0)}       # spawn starts in the supervisor
        self.sup, self.coord, inbox = (Channel(q, stop_requested=stop_requested)
                                       for q in (args.sup_queue, args.coord_queue, args.inbox))
        self.ring = Ring.attach(args.ring_name)
        self.ring_tensor = torch.frombuffer(self.ring.map, dtype=torch.uint8)
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.registrar = SlotRegistrar(self.ring, self.ring_tensor, self.cuda)
        self.reader = InboxReader(inbox)
        self.reader.channel = RequestTap(inbox)    # requests aside; the reader keeps the rest
        self.info = {"pid": os.getpid(), "device": args.device, "torch_threads": torch_threads}
        self.tp = None
        self.keep = 0

    def open_device(self) -> None:
        """The device's facts (name, free memory), the memory cap, and with ranks this rank's shard."""
        torch, args, device = self.torch, self.args, self.device
        if self.cuda and not torch.cuda.is_available():   # the command chose cuda without asking torch
            raise RingllmError("device cuda (--device, or the default on a machine with an NVIDIA GPU and a CUDA "
                               "build of torch): no CUDA device is available to torch; run with --device cpu")
        if self.cuda and device.index is None:
            device = self.device = torch.device("cuda", torch.cuda.current_device())
        if self.cuda and device.index >= torch.cuda.device_count():
            raise RingllmError(f"--devices: rank {args.rank}'s CUDA device {device.index} does not exist (this "
                               f"machine has {torch.cuda.device_count()} visible: 0..{torch.cuda.device_count() - 1})")
        self.registrar.device = device if self.cuda else None
        self.info["device"] = str(device)
        if self.cuda:
            torch.cuda.set_device(device)
            free, total = torch.cuda.mem_get_info(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.info.update(name=torch.cuda.get_device_name(device), free_bytes=free, total_bytes=total)
            if args.engine.gpu_mem is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.engine.gpu_mem / total), device)
        if args.world > 1:       # this rank's share of every layer, and the other ranks
            self.tp, shard = join_ranks(args, device)
            self.args = replace(args, layout=shard)
            self.info.update(rank=args.rank, world=args.world, tp_backend=args.dist_backend)

    def plan_resident_layers(self) -> None:
        """How many layers stay on the device; the coordinator learns it (it may have started on
        the supervisor's estimate, exact unless it needed the free GPU memory)."""
        from ringllm.workers.quantized import choose_fp8_matmul
        from ringllm.workers.weights import torch_dtype

        args = self.args
        self.dtype = torch_dtype(args.dtype)
        self.fp8_matmul = choose_fp8_matmul(args.engine.fp8_matmul, args.layout, self.device, self.dtype)
        self.info["fp8_matmul"] = self.fp8_matmul
        free = self.info.get("free_bytes")
        self.keep = resident_layer_count(args, self.device.type, free // args.device_sharers if free else free)
        if self.tp is not None:     # one count for every rank: what fits on the fullest GPU
            self.keep = agree_min(self.keep, self.device)
        if args.rank == 0:
            self.coord.send(ResidentLayers(self.keep), timeout=args.engine.wait_timeout_s)
        if self.cuda:
            self.registrar.begin(args.layout.config.num_layers - self.keep)   # [P18] filled slots get pinned from now on
        self.phases["attach"] = (self.t0, time.monotonic())

    def load_and_warm_up(self) -> None:
        """The resident weights, and the kernels' one-time costs paid while the loaders fill the ring."""
        from ringllm.workers.model import Llama
        from ringllm.workers.resident import load_groups, load_resident_weights
        from ringllm.workers.weights import group_weights

        torch, args, device = self.torch, self.args, self.device
        t0 = time.monotonic()
        readers = args.engine.loaders     # as many parallel reads as the run has loaders
        self.resident = load_resident_weights(args.layout, self.dtype, device, embed_on_host=self.cuda,
                                              threads=readers, direct=args.warmed_layers < 0)
        # Warm up before the resident layers load: on an H200 host those were the last bytes to
        # arrive, and a warm-up after them added its 0.7-1.5 s to the first token. Any
        # layer-shaped weights do: zeros of layer 0's groups, freed before the resident layers
        if self.tp is not None:
            meet_ranks(device)   # the gathers' shorter timeout starts once every rank is here
        t1 = time.monotonic()
        placeholders = [group_weights(torch.zeros(args.layout.group(0, k).nbytes, dtype=torch.uint8, device=device),
                                      args.layout.group(0, k)) for k in ("attn", "ffn")]
        rows, _, prompt_len = planned_shape(args)
        Llama(args.layout.config, self.resident, None, self.dtype, device, self.fp8_matmul, tp=self.tp).warm_up_kernels(
            rows, prompt_len, *placeholders)
        del placeholders
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        self.phases["warm_up"] = (t1, time.monotonic())
        self.resident_groups = load_groups(args.layout, range(self.keep), self.dtype, device, threads=readers,
                                           warmed=args.warmed_layers)
        self.phases["resident_load"] = (t0, time.monotonic())   # its time includes the warm-up's
        self.info.update(resident_layers=self.keep, resident_load_seconds=self.phases["resident_load"][1] - t0)
        if self.tp is not None:
            meet_ranks(device)   # as above: their resident layers may take each rank its own time
        n = args.layout.config.num_layers
        if self.keep:
            log.info("layers 0..%d stay on %s (%d of %d); the other %d stream", self.keep - 1,
                     "the GPU" if self.cuda else "cpu, loaded once", self.keep, n, n - self.keep)

    def start_streaming(self) -> None:
        """The streamed weight source and the engine over it; then Ready."""
        from ringllm.workers.engine import Engine
        from ringllm.workers.model import Llama
        from ringllm.workers.streaming import StreamingSource

        args = self.args
        self.reader.start()
        # [P11] one writer per stats record: rank 0's figures stand for the run (as in Finished)
        page = StatsPage(args.stats_name) if args.stats_name and args.rank == 0 else None
        self.source = StreamingSource(args.layout, list(args.plans), args.engine, self.ring, self.ring_tensor,
                                      self.device, self.coord, self.reader, resident=self.resident_groups,
                                      chaos=args.faults.chaos, stats_page=page, registrar=self.registrar,
                                      passes=planned_passes(args), rank=args.rank)
        model = Llama(args.layout.config, self.resident, self.source, self.dtype, self.device, self.fp8_matmul,
                      tp=self.tp)
        rows, context, _ = planned_shape(args)
        self.engine = Engine(model, rows, context, draft=getattr(args.sampling, "draft", None))
        self.sup.send(Ready("gpu", args.rank, self.info))

    def run_requests(self) -> None:
        """The request loop (workers.request_loop); a generate run first waits for the ring if the
        bench asks, times its passes and reports its figures at the end."""
        from ringllm.workers.request_loop import RequestLoop

        args, torch = self.args, self.torch
        generating = args.serve is None
        if generating and args.fill_ring_first:
            wait_for_ring(self.ring, min(self.ring.slot_count, args.layout.config.num_layers - self.keep),
                          args.engine.wait_timeout_s)
            if args.rank == 0:
                self.coord.send(Mark(), timeout=args.engine.wait_timeout_s)   # timed part starts here
        loop = RequestLoop(args, self.engine, self.source, self.sup, self.reader, self.device)
        first_pass_start = time.monotonic()
        loop.first_pass_done = lambda: self.phases.__setitem__("first_pass", (first_pass_start, time.monotonic()))
        if args.engine.warmup_layers:
            self.source.warm_up()
        with self.profiled():
            loop.run(generating)
        if not generating:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        s = self.source.stats
        loop.finished({"h2d_bytes": s.h2d_bytes, "h2d_copies": s.h2d_copies, "wait_seconds": s.wait_seconds,
                       "waits": s.waits, "groups_served": s.groups_served,
                       "peak_gpu_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
                       "phases": self.phases, **self.registrar.report(),
                       # torch must see the ring as page-locked, or non_blocking copies from it go synchronous
                       "ring_pinned": _slots_pinned(self.ring, self.ring_tensor, self.registrar) if self.cuda else None})

    @contextlib.contextmanager
    def profiled(self):
        """--profile-trace: a Chrome trace (torch.profiler) of the passes."""
        if not self.args.profile_trace:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as profiler:
            yield
            if self.cuda:
                self.torch.cuda.synchronize(self.device)
        profiler.export_chrome_trace(self.args.profile_trace)

    def report_fatal(self, err: BaseException) -> None:
        log.debug("GPU process failed", exc_info=True)
        try:
            # our own errors are already one line for the user; anything else says what it is
            text = str(err) if isinstance(err, RingllmError) else f"{type(err).__name__}: {err}"
            self.sup.send(Fatal("gpu", self.args.rank, text), timeout=2)   # Fatal fits the text
        except Exception:
            pass

    def close(self) -> None:
        self.reader.stop.set()
        self.registrar.stop.set()
        if self.registrar.is_alive():
            self.registrar.join(timeout=60)      # it is at most inside one slot's registration
        if self.registrar.device is not None:      # CUDA was there and in use
            self.torch.cuda.synchronize(self.device)
            self.registrar.unregister_all()
        del self.ring_tensor
        self.ring.close()
        if self.args.world > 1:
            from ringllm.workers.tensor_parallel import close_distributed
            close_distributed()


def join_ranks(args: GpuArgs, device):
    """Tensor parallel: meet the other ranks (torch.distributed: NCCL between GPUs, gloo on cpu)
    and take this rank's share of every layer. Returns the workers.tensor_parallel.TensorParallel
    the model gathers through, and the shard's layout (checkpoint.sharding)."""
    from ringllm.checkpoint.sharding import ShardPlan, shard_layout
    from ringllm.workers.tensor_parallel import TensorParallel, init_distributed

    # NVLink multicast stays off (a program using it can take a shared host's GPUs out of service)
    for var, off in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, off)
    layout = shard_layout(args.layout, args.rank, args.world)
    # Start-up's collectives (agree_min, meet_ranks) wait as long as start-up may take; past it the
    # ranks run in lock-step, and a rank waits on a layer at most wait_timeout_s before it fails
    # itself, so a gather that waits twice that has lost its partner (a rank hung, not dead:
    # the supervisor names a dead one within seconds)
    gathers = init_distributed(args.rank, args.world, args.dist_addr, args.dist_port, args.dist_backend,
                               args.engine.startup_timeout_s, 2 * args.engine.wait_timeout_s)
    return TensorParallel(args.rank, args.world, ShardPlan.of(args.layout.config, args.world), gathers), layout


def agree_min(value: int, device) -> int:
    """The smallest of every rank's `value` (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def meet_ranks(device) -> None:
    """Wait until every rank is here (a collective on the start-up group, whose timeout is
    start-up's)."""
    agree_min(0, device)


def _slots_pinned(ring: Ring, ring_tensor, registrar: SlotRegistrar) -> bool:
    """Every registered slot reads as page-locked to torch (registration of one slot of the
    shared segment is seen by torch exactly as a whole-ring registration was)."""
    slots = [s for s, done in enumerate(registrar.registered) if done]
    return bool(slots) and all(bool(ring_tensor[ring.slot_base(s):ring.slot_base(s) + 1].is_pinned()) for s in slots)
