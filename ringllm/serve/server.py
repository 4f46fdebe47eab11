"""`ringllm serve`: load the model, start the engine thread, run uvicorn until SIGINT/SIGTERM,
then drain: stop admitting (still listening: 503s, /health draining), let in-flight requests
finish within --drain-timeout (a second signal: at once), cancel the rest, stop the engine thread,
exit 0."""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

log = logging.getLogger("ringllm")

API_KEY_ENV = "RINGLLM_API_KEY"
# --max-connections' default: room beyond --max-batch + --max-waiting requests for /health,
# /metrics and requests that are refused
CONTROL_CONNECTIONS = 64


def load_engine(layout, device_type: str, dtype_name: str, max_batch: int, max_context: int, sampling=None):
    """The in-process engine over the resident model (as `ringllm generate --resident` builds it):
    workers.engine.Engine over --max-batch KV rows, with the server's draft if any."""
    from ringllm.workers.engine import Engine
    from ringllm.workers.resident import load_resident_model

    model = load_resident_model(layout, device_type, dtype_name)
    return Engine(model, max_batch, max_context, draft=getattr(sampling, "draft", None)), max_batch


def load_streaming_engine(args, layout, device: str, dtype_name: str, max_batch: int, max_context: int,
                          parallel, sampling):
    """The default engine: the supervisor, coordinator, loaders and a GPU process (one a rank of
    `parallel`, generate.parallel_plan's) that runs Engine over the streamed model
    (supervisor.serving.ServedEngine). Refuses, before any process starts, when --max-batch rows of
    --max-context tokens do not fit --gpu-mem."""
    from ringllm.choose import build_engine_config
    from ringllm.supervisor.supervisor import Supervisor
    from ringllm.workers.memory_plan import check_gpu_cap, fmt_bytes, plan_gpu_memory, serve_pass_tokens
    from ringllm.workers.spec_plan import spec_plan

    plan_layout = parallel.planned_layout(layout)      # with ranks, what one GPU holds of each layer
    pass_tokens = serve_pass_tokens(max_batch, max_context)     # the workspace is one pass's
    spec = spec_plan(sampling)
    engine = build_engine_config(args, args.model, max_context, max_batch, layout, device, dtype_name, spec,
                                 plan_layout=plan_layout, pass_tokens=pass_tokens)
    plan = plan_gpu_memory(plan_layout, engine, max_batch, max_context, dtype_name, embed_on_host=device == "cuda",
                           spec=spec, pass_tokens=pass_tokens)
    cap = f"--gpu-mem {fmt_bytes(engine.gpu_mem)}" if engine.gpu_mem is not None else "no --gpu-mem cap"
    log.info("memory plan: %d sequences (--max-batch) of %d tokens (--max-context): KV cache %s + resident %s + "
             "group buffers %s + workspace %s (a pass of %d tokens at most) = %s at the least, %s", max_batch,
             max_context, fmt_bytes(plan.kv_cache), fmt_bytes(plan.resident), fmt_bytes(plan.group_buffers),
             fmt_bytes(plan.workspace), pass_tokens, fmt_bytes(plan.minimum), cap)
    check_gpu_cap(plan, engine.gpu_mem, engine)
    sup = Supervisor(layout, engine, device, dtype_name, verbose=args.verbose, parallel=parallel)
    return sup.serve_engine(max_batch, max_context, sampling)


def server_draft(args, draft, layout, device: str, dtype_name: str, max_context: int):
    """The server-wide draft (--draft ngram | --draft-model DIR) as the sampling the engine is
    planned and started with (speculation.SpeculativeSampling), or None; --spec-tokens auto chosen."""
    from ringllm.run_options import serve_spec_tokens
    from ringllm.workers.spec_plan import AUTO
    from ringllm.workers.speculation import SpeculativeSampling, check_draft_vocab

    if draft is None:
        return None
    if draft.model_dir is not None:
        check_draft_vocab(args.model, draft.model_dir)     # one line, before anything starts
    sampling = SpeculativeSampling(draft=draft)
    if args.spec_tokens == AUTO:
        sampling = serve_spec_tokens(layout, sampling, device, dtype_name, max_context)
    return sampling


def check_serve_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise RingllmError(f"ringllm serve needs the serve extra (missing {', '.join(missing)}): "
                           "pip install 'ringllm[serve]'")


def cmd_serve(args) -> int:
    from ringllm.checkpoint.dtypes import NAME_OF_TAG
    from ringllm.checkpoint.layout import load_layout
    from ringllm.checkpoint.text import TextCodec
    from ringllm.cli_input import check_model_arg
    from ringllm.device_probe import default_device
    from ringllm.run_options import draft_params, parallel_plan

    check_serve_extra()
    from ringllm.serve.gate import default_allowed_hosts, is_loopback

    if args.max_connections is None:
        args.max_connections = args.max_batch + args.max_waiting + CONTROL_CONNECTIONS
    for name in ("max_batch", "max_waiting", "max_body_bytes", "max_connections"):
        if getattr(args, name) < 1:
            raise RingllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        raise RingllmError(f"--port must be in 1..65535, got {args.port}")
    if not math.isfinite(args.drain_timeout) or args.drain_timeout < 0:
        raise RingllmError(f"--drain-timeout must be a finite number of seconds >= 0, got {args.drain_timeout}")
    api_key = checked_api_key(args.api_key)
    if api_key is None and not is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who reaches this address can use it "
                    "(--api-key or %s)", args.host, API_KEY_ENV)
    check_model_arg(args.model)
    # the ranks, checked as generate checks them: --resident is one process, so with
    # --tensor-parallel N > 1 it is refused here rather than serving on one process
    parallel = parallel_plan(args, None)
    draft = draft_params(args)
    layout = load_layout(args.model)
    context = layout.config.max_position_embeddings
    max_context = args.max_context if args.max_context is not None else context
    if not 2 <= max_context <= context:
        raise RingllmError(f"--max-context must be in 2..{context} (the model's max_position_embeddings), "
                           f"got {max_context}")
    codec = TextCodec(args.model, layout.config)
    device = args.device or default_device()
    dtype_name = NAME_OF_TAG.get(layout.dtype, layout.dtype) if args.dtype == "auto" else args.dtype
    sampling = server_draft(args, draft, layout, device, dtype_name, max_context)

    from ringllm.serve.app import ServeSettings, create_app
    from ringllm.serve.runner import EngineRunner

    sock = listen(args.host, args.port)     # a taken port fails before the model loads
    try:
        if args.resident:
            engine, max_batch = load_engine(layout, device, dtype_name, args.max_batch, max_context, sampling)
        else:
            engine, max_batch = load_streaming_engine(args, layout, device, dtype_name, args.max_batch,
                                                      max_context, parallel, sampling), args.max_batch
        try:
            runner = EngineRunner(engine, max_batch, args.max_waiting)
            settings = ServeSettings(args.served_model_name or Path(args.model).resolve().name, max_context,
                                     api_key, args.max_body_bytes, args.drain_timeout,
                                     default_allowed_hosts(args.host, comma_list(args.allowed_hosts)),
                                     comma_list(args.allowed_origins))
            app = create_app(runner, codec, settings)
            runner.start()
            try:
                if getattr(engine, "signalled", None) is None:    # none came between start-up and now
                    serve_until_signal(app, runner, sock, args.drain_timeout, args.max_connections)
            finally:
                runner.stop()
        finally:
            if hasattr(engine, "close"):     # the streaming engine: its processes and shared memory
                engine.close()
    finally:
        sock.close()
    if runner.failure is not None:      # the engine died: non-zero, so that a process manager restarts us
        raise RingllmError(runner.failure)
    return 0


def checked_api_key(flag: str | None) -> str | None:
    """--api-key, else $RINGLLM_API_KEY, else None (no key). An empty key is refused: no client
    could send it (README's --api-key "$KEY" with KEY unset gives one)."""
    key, source = (flag, "--api-key") if flag is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and not key.strip():
        raise RingllmError(f"{source} is empty (an unset variable?): no client could use the server; "
                           f"give a key, or no {source} to serve without one")
    if key is not None and key != key.strip():
        raise RingllmError(f"{source} has leading or trailing spaces, which no client can send")
    return key


def comma_list(flag: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (flag or "").split(",") if item.strip())


def listen(host: str, port: int):
    """The listening socket, bound here: a taken port is one `ringllm: error:` line, not uvicorn's exit."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise RingllmError(f"--host {host}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise RingllmError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def serve_until_signal(app, runner, sock, drain_s: float, max_connections: int) -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's own answer to a signal stops listening at once, and to a second one cuts every
        stream (force_exit): here the server listens through the drain (503s, /health draining)
        and stops once it is over; a second signal only ends the drain now (what is in flight is
        cancelled, each stream still ends with its error event and [DONE])."""
        drain: threading.Thread | None = None

        def handle_exit(self, sig, frame):
            if self.drain is not None:
                log.info("second signal: cancelling the %d request(s) in flight now", runner.in_flight)
                runner.end_drain_now()
                return
            log.info("draining: no new requests; %d in flight get %.0f s", runner.in_flight, drain_s)
            runner.begin_drain()

            def drain_then_exit():
                runner.drain(drain_s)
                self.should_exit = True

            self.drain = threading.Thread(target=drain_then_exit, name="ringllm-drain", daemon=True)
            self.drain.start()

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, access_log=False, log_config=None, lifespan="off",
                            timeout_graceful_shutdown=drain_s + 10.0, timeout_keep_alive=5,
                            limit_concurrency=max_connections)    # beyond it uvicorn answers 503
    server = DrainingServer(config)
    runner.on_failure = lambda: setattr(server, "should_exit", True)     # the requests got their 503
    # (uvicorn re-raises the signals its handle_exit recorded once it has shut down; this one
    # records none: the drain is the whole answer to them)
    log.info("serving on http://%s:%d/v1", host, port)
    server.run(sockets=[sock])
    log.info("stopped")
