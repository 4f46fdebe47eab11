"""GPU process: the only process that touches CUDA. Maps the ring, says which layers stay on the
GPU (the coordinator may already be loading on the supervisor's estimate), registers the ring
with CUDA slot by slot as the loaders fill it (workers.registrar), loads the GPU-resident
weights and warms the kernels up while the disk fills the ring, runs generation with a
StreamingSource and reports tokens. Each start-up phase is timed (`phases`, time.monotonic(),
one clock for every process of the run)."""
from __future__ import annotations

import logging
import os
import queue
import secrets
import signal
import time
from dataclasses import dataclass, replace

from ringllm.checkpoint.errors import RingllmError
from ringllm.faults import NO_FAULTS, FaultPlan
from ringllm.shm.channel import (Cancel, Channel, Fatal, Finished, Mark, Options, PromptPart, Ready, ResidentLayers,
                                 Submit, event_messages, event_rows, token_messages)
from ringllm.shm.ring import Ring
from ringllm.shm.stats import StatsPage
from ringllm.workers.process_setup import apply_torch_threads, child_start, sigterm_deferred, stop_requested
from ringllm.workers.registrar import SlotRegistrar

log = logging.getLogger("ringllm.gpu")
IDLE_WAIT_S = 0.1     # serve mode: an idle GPU process looks for requests and Shutdown this often


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
    """(batch, max_seq, prompt length) the memory plan and the warm-up assume: the prompts of a
    generate run, or serve's max_batch rows of max_context slots."""
    from ringllm.workers.speculation import cache_slots

    if args.serve is not None:
        max_batch, max_context = args.serve
        return max_batch, max_context, min(max_context - 1, 16)
    longest = max(len(p) for p in args.prompts)
    # the same sequence length and speculation as every other planner call (ringllm.generate)
    return len(args.prompts), cache_slots(longest, args.max_new_tokens, args.sampling), longest


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

        from ringllm.workers.generation import Sampler, generate
        from ringllm.workers.model import Llama
        from ringllm.workers.quantized import choose_fp8_matmul
        from ringllm.workers.resident import load_groups, load_resident_weights
        from ringllm.workers.speculation import SpecStats
        from ringllm.workers.streaming import InboxReader, StreamingSource
        from ringllm.workers.weights import group_weights, torch_dtype

    t0 = time.monotonic()
    phases = {"spawn": (None, t0)}       # name -> (start, end): time.monotonic(); spawn starts in the supervisor
    sup, coord, inbox = (Channel(q, stop_requested=stop_requested)
                         for q in (args.sup_queue, args.coord_queue, args.inbox))
    ring = Ring.attach(args.ring_name)
    ring_tensor = torch.frombuffer(ring.map, dtype=torch.uint8)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    registrar = SlotRegistrar(ring, ring_tensor, cuda)
    reader = InboxReader(inbox)
    try:
        if cuda and not torch.cuda.is_available():   # the command chose cuda without asking torch
            raise RingllmError("device cuda (--device, or the default on a machine with an NVIDIA GPU and a CUDA "
                               "build of torch): no CUDA device is available to torch; run with --device cpu")
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if cuda and device.index >= torch.cuda.device_count():
            raise RingllmError(f"--devices: rank {args.rank}'s CUDA device {device.index} does not exist (this "
                               f"machine has {torch.cuda.device_count()} visible: 0..{torch.cuda.device_count() - 1})")
        registrar.device = device if cuda else None
        info = {"pid": os.getpid(), "device": str(device), "torch_threads": torch_threads}
        if cuda:
            torch.cuda.set_device(device)
            free, total = torch.cuda.mem_get_info(device)
            torch.cuda.reset_peak_memory_stats(device)
            info.update(name=torch.cuda.get_device_name(device), free_bytes=free, total_bytes=total)
            if args.engine.gpu_mem is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.engine.gpu_mem / total), device)
        tp = None
        if args.world > 1:       # this rank's share of every layer, and the other ranks
            tp, shard = join_ranks(args, device)
            args = replace(args, layout=shard)
            info.update(rank=args.rank, world=args.world, tp_backend=args.dist_backend)
        dtype = torch_dtype(args.dtype)
        fp8_matmul = choose_fp8_matmul(args.engine.fp8_matmul, args.layout, device, dtype)   # one log line at most
        info["fp8_matmul"] = fp8_matmul
        n = args.layout.config.num_layers
        free = info.get("free_bytes")
        keep = resident_layer_count(args, device.type, free // args.device_sharers if free else free)
        if tp is not None:     # one count for every rank: what fits on the fullest GPU
            keep = agree_min(keep, device)
        # The coordinator starts on the supervisor's estimate where there is one (it is exact
        # unless it needed the free GPU memory), else on this message; it adjusts to it either way.
        if args.rank == 0:
            coord.send(ResidentLayers(keep), timeout=args.engine.wait_timeout_s)
        if cuda:
            registrar.begin(n - keep)     # [P18] from now on filled slots get pinned, while the rest fill
        phases["attach"] = (t0, time.monotonic())
        t0 = time.monotonic()
        # as many parallel reads as the run has loaders: what this disk was found to want
        readers = args.engine.loaders
        resident = load_resident_weights(args.layout, dtype, device, embed_on_host=cuda, threads=readers,
                                         direct=args.warmed_layers < 0)
        # Pay the one-time kernel costs now, while the loaders fill the ring, and before the
        # resident layers load: on an H200 host those were the last bytes to arrive, and a
        # warm-up after them added its 0.7-1.5 s to the first token. Any layer-shaped weights do:
        # zeros of layer 0's groups, freed before the resident layers and group buffers exist.
        if tp is not None:
            meet_ranks(device)   # the gathers' shorter timeout starts once every rank is here
        t1 = time.monotonic()
        placeholders = [group_weights(torch.zeros(args.layout.group(0, k).nbytes, dtype=torch.uint8, device=device),
                                      args.layout.group(0, k)) for k in ("attn", "ffn")]
        batch, _, prompt_len = planned_shape(args)
        Llama(args.layout.config, resident, None, dtype, device, fp8_matmul, tp=tp).warm_up_kernels(
            batch, prompt_len, *placeholders)
        del placeholders
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        phases["warm_up"] = (t1, time.monotonic())
        resident_groups = load_groups(args.layout, range(keep), dtype, device, threads=readers,
                                      warmed=args.warmed_layers)
        phases["resident_load"] = (t0, time.monotonic())   # its time includes the warm-up's
        info.update(resident_layers=keep, resident_load_seconds=phases["resident_load"][1] - t0)
        if tp is not None:
            meet_ranks(device)   # as above: their resident layers may take each rank its own time
        if keep:
            log.info("layers 0..%d stay on %s (%d of %d); the other %d stream", keep - 1,
                     "the GPU" if cuda else "cpu, loaded once", keep, n, n - keep)
        if args.serve is not None:
            reader.channel = RequestTap(inbox)    # Submit/Cancel aside; the reader keeps the rest
        reader.start()
        # [P11] one writer per stats record: rank 0's figures stand for the run (as in Finished)
        page = StatsPage(args.stats_name) if args.stats_name and args.rank == 0 else None
        source = StreamingSource(args.layout, list(args.plans), args.engine, ring, ring_tensor, device,
                                 coord, reader, resident=resident_groups, chaos=args.faults.chaos,
                                 stats_page=page, registrar=registrar,
                                 passes=None if args.serve is not None else args.max_new_tokens, rank=args.rank)
        sup.send(Ready("gpu", args.rank, info))
        model = Llama(args.layout.config, resident, source, dtype, device, fp8_matmul, tp=tp)
        if args.serve is not None:
            if args.engine.warmup_layers:
                source.warm_up()
            serve_requests(args, model, source, sup, reader)
            return
        if args.fill_ring_first:
            wait_for_ring(ring, min(ring.slot_count, n - keep), args.engine.wait_timeout_s)
            if args.rank == 0:
                coord.send(Mark(), timeout=args.engine.wait_timeout_s)   # timed part starts here
        t_start = time.perf_counter()
        first_pass_start = time.monotonic()
        if args.engine.warmup_layers:
            source.warm_up()
        # when the first and the last pass ended, and how many passes: what the stats need, not a
        # list that grows with the run
        token_at = {"first": None, "last": None, "passes": 0}

        def on_tokens(tokens):
            token_at["last"] = time.perf_counter()    # after sampling: the pass is complete
            token_at["passes"] += 1
            if token_at["first"] is None:
                token_at["first"] = token_at["last"]
                phases["first_pass"] = (first_pass_start, time.monotonic())
            source.tokens += 1
            source.publish(force=True)
            if args.rank == 1 and source.tokens == args.faults.rank_stops_after_tokens:
                os.kill(os.getpid(), signal.SIGSTOP)       # tests: a hung rank
            if args.rank > 0:     # every rank samples the same tokens (full logits, same seed): rank 0 tells
                return
            for part in token_messages(tokens):     # a big batch does not fit one message
                sup.send(part, timeout=args.engine.wait_timeout_s)

        profiler = None
        if args.profile_trace:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            profiler = profile(activities=activities)
            profiler.__enter__()
        spec = SpecStats() if getattr(args.sampling, "draft", None) is not None else None
        sampling = args.sampling
        if args.faults.rank_seed_skew and args.rank == 1 and sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + 1)       # tests: a rank that diverges
        outputs = generate(model, [list(p) for p in args.prompts], args.max_new_tokens,
                           Sampler(sampling, device), args.eos_ids, on_tokens,
                           args.layout.config.max_position_embeddings, spec)
        if profiler is not None:
            if cuda:
                torch.cuda.synchronize(device)
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(args.profile_trace)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_start
        s = source.stats
        stats = {"new_tokens": sum(len(o) for o in outputs), "seconds": elapsed,
                 "first_token_seconds": (token_at["first"] - t_start) if token_at["passes"] else None,
                 # decode: from the first token (end of prefill) to the last
                 "decode_steps": max(0, token_at["passes"] - 1),
                 "decode_seconds": token_at["last"] - token_at["first"] if token_at["passes"] > 1 else 0.0,
                 "h2d_bytes": s.h2d_bytes, "h2d_copies": s.h2d_copies, "wait_seconds": s.wait_seconds,
                 "waits": s.waits, "groups_served": s.groups_served,
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                 "phases": phases, **registrar.report(),
                 # --draft: passes, tokens per pass, acceptance (a pass may give several tokens)
                 "speculation": spec.as_dict() if spec is not None else None,
                 # torch must see the ring as page-locked, or non_blocking copies from it go synchronous
                 "ring_pinned": _slots_pinned(ring, ring_tensor, registrar) if cuda else None}
        # every rank says what it generated: ranks that drifted apart (different seeds, a
        # nondeterministic kernel) fed each other wrong activations, and the run must not pass
        digest = {"rank": args.rank, "outputs_digest": outputs_digest(outputs)}
        sup.send(Finished({**stats, **digest} if args.rank == 0 else digest), timeout=args.engine.wait_timeout_s)
        reader.shutdown.wait(timeout=args.engine.wait_timeout_s)
    except SystemExit:
        raise
    except BaseException as err:  # report, then exit non-zero: the supervisor ends the run
        log.debug("GPU process failed", exc_info=True)
        try:
            # our own errors are already one line for the user; anything else says what it is
            text = str(err) if isinstance(err, RingllmError) else f"{type(err).__name__}: {err}"
            sup.send(Fatal("gpu", args.rank, text), timeout=2)   # Fatal fits the text
        except Exception:
            pass
        raise SystemExit(1)
    finally:
        reader.stop.set()
        registrar.stop.set()
        if registrar.is_alive():
            registrar.join(timeout=60)      # it is at most inside one slot's registration
        if registrar.device is not None:      # CUDA was there and in use
            torch.cuda.synchronize(device)
            registrar.unregister_all()
        del ring_tensor
        ring.close()
        if args.world > 1:
            from ringllm.workers.tensor_parallel import close_distributed
            close_distributed()


def outputs_digest(outputs: list[list[int]]) -> str:
    """A short hash of a run's tokens, which every tensor-parallel rank reports (they must agree)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]


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


class RequestTap:
    """The GPU inbox as the InboxReader sees it in serve mode: Submit, PromptPart and Cancel go to
    `requests` (the serve loop's), everything else (SlotReady, Shutdown) to the reader as before."""

    def __init__(self, channel: Channel):
        self.channel, self.requests = channel, queue.Queue()

    def receive(self, timeout: float):
        msg = self.channel.receive(timeout)
        if isinstance(msg, (Submit, PromptPart, Cancel, Options)):
            self.requests.put(msg)
            return None
        return msg


def serve_requests(args: GpuArgs, model, source, sup: Channel, reader) -> None:
    """`ringllm serve`: one BatchEngine over the streaming model. Each step is one weight pass that
    advances every running request; requests join and leave between passes. Idle, it blocks on
    its requests (bounded), so a Shutdown is seen within IDLE_WAIT_S."""
    from ringllm.workers.batching import BatchEngine, BatchRequest
    from ringllm.workers.sampling import SamplingParams

    max_batch, max_context = args.serve
    engine = BatchEngine(model, max_batch, max_context)
    device = model.device
    requests: queue.Queue = reader.channel.requests
    parts: dict[int, list] = {}      # id -> the prompt's tokens so far (PromptPart messages)
    options: dict[int, tuple[Options, list]] = {}   # id -> its Options and logit_bias pairs so far
    refused: list = []               # event rows of requests the engine refused at submit
    timeout = args.engine.wait_timeout_s

    def take(msg) -> None:
        if isinstance(msg, PromptPart):
            parts.setdefault(msg.id, []).extend(msg.tokens)
        elif isinstance(msg, Options):
            options.setdefault(msg.id, (msg, []))[1].extend(tuple(pair) for pair in msg.logit_bias)
        elif isinstance(msg, Cancel):
            engine.cancel(str(msg.id))
        elif isinstance(msg, Submit):
            prompt = parts.pop(msg.id, []) + list(msg.tokens)
            for pending in (parts, options):     # ids rise: what is older is of a Submit that never came
                for stale in [i for i in pending if i < msg.id]:
                    del pending[stale]
            if len(prompt) != msg.prompt_len:      # a protocol bug, not a user error
                raise RingllmError(f"request {msg.id}: {len(prompt)} prompt tokens arrived of {msg.prompt_len}")
            seed = msg.seed
            if args.faults.rank_seed_skew and args.rank == 1 and seed is not None:
                seed += 1                                   # tests: a rank that diverges
            opts, bias = options.pop(msg.id, (Options(msg.id, None, False, 0.0, 0.0, []), []))
            sampling = SamplingParams(msg.temperature, msg.top_p, msg.top_k, seed, opts.presence_penalty,
                                      opts.frequency_penalty, tuple(bias))
            try:
                engine.submit(BatchRequest(str(msg.id), tuple(prompt), msg.max_tokens, sampling, tuple(msg.eos_ids),
                                           opts.logprobs, opts.prompt_logprobs))
            except Exception:     # the supervisor checked it first; one request's fault fails it alone
                log.warning("request %d refused", msg.id, exc_info=True)
                refused.extend(event_rows(msg.id, None, "error", len(prompt), 0))   # (+= would make it local)

    def arrived() -> list:
        """Rank 0: the messages that came (waiting up to IDLE_WAIT_S when there is nothing to do)."""
        got = []
        try:
            got.append(requests.get(timeout=IDLE_WAIT_S if engine.idle() and not refused else 0))
            while True:
                got.append(requests.get_nowait())
        except queue.Empty:
            pass
        return got

    while True:
        # Ranks: every rank must run the same passes over the same requests (each pass is a chain
        # of collectives). Rank 0 alone reads the requests (the supervisor sends them only there)
        # and hands each round's messages, and the stop, to the others, at least every
        # IDLE_WAIT_S: their wait stays far inside the collectives' timeout.
        if args.rank == 0:
            msgs, stop = arrived(), reader.shutdown.is_set()
            if args.world > 1:      # one seed for a request on every rank: they sample alike
                msgs = [replace(m, seed=secrets.randbits(62)) if isinstance(m, Submit) and m.seed is None else m
                        for m in msgs]
        else:
            msgs, stop = [], False
        if args.world > 1:
            msgs, stop = model.tp.from_rank_0([msgs, stop], device)
        if stop:
            break
        for msg in msgs:
            take(msg)
        rows, refused[:] = list(refused), []
        forward = False
        if not engine.idle():
            served = source.stats.groups_served
            events = engine.step()
            forward = source.stats.groups_served > served
            if forward:
                source.tokens += 1
                source.publish(force=True)
            step_rows = [[int(e.id), e.token, e.finish, e.prompt_tokens, e.completion_tokens] for e in events]
            if args.world > 1 and forward:
                # every pass, not at the end as generate does: a server has no end, and ranks that
                # sampled apart feed each other wrong activations from the next pass on
                differ = model.tp.disagreeing(int(outputs_digest(step_rows), 16) >> 1, device)
                if differ and args.rank == 0:
                    raise RingllmError(f"tensor parallel: rank(s) {differ} sampled other tokens than rank 0; the "
                                       "ranks diverged (their activations no longer belong together)")
                if differ:        # rank 0's report ends the run: the others wait for its Shutdown
                    reader.shutdown.wait(timeout)
                    return
            rows += [row for e in events for row in event_rows(int(e.id), e.token, e.finish, e.prompt_tokens,
                                                               e.completion_tokens, e.logprob, e.prompt_logprobs)]
        if args.rank == 0 and (rows or forward):
            for msg in event_messages(rows, forward):
                sup.send(msg, timeout=timeout)


def _slots_pinned(ring: Ring, ring_tensor, registrar: SlotRegistrar) -> bool:
    """Every registered slot reads as page-locked to torch (registration of one slot of the
    shared segment is seen by torch exactly as a whole-ring registration was)."""
    slots = [s for s, done in enumerate(registrar.registered) if done]
    return bool(slots) and all(bool(ring_tensor[ring.slot_base(s):ring.slot_base(s) + 1].is_pinned()) for s in slots)
