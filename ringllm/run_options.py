"""What `ringllm generate` and `ringllm serve` take alike from their flags, checked before
anything starts: the ranks (--tensor-parallel), the draft (--draft, --draft-model, --spec-tokens)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

log = logging.getLogger("ringllm")


def draft_params(args):
    """The run's DraftParams from --draft / --draft-model / --spec-tokens / --ngram-max, or None.
    --spec-tokens auto is chosen once the run's shape is known (resolve_spec_tokens, serve_spec_tokens);
    until then the draft is checked with a placeholder of 1."""
    from ringllm.workers.spec_plan import AUTO
    from ringllm.workers.speculation import DraftParams

    kind = draft_kind(args)
    if kind is None and args.spec_tokens != AUTO:
        raise RingllmError(f"--spec-tokens {args.spec_tokens}: sets the draft tokens a pass verifies, and no draft was "
                           "given (--draft ngram or --draft-model DIR)")
    if kind is None:
        return None
    draft = DraftParams(kind, 1 if args.spec_tokens == AUTO else args.spec_tokens, args.ngram_max)
    draft.validate()
    return draft


def parallel_plan(args, draft):
    """--tensor-parallel N [--devices LIST]: the ranks of the run (supervisor.parallel)."""
    from ringllm.supervisor.parallel import TensorParallelPlan

    world = args.tensor_parallel
    if world < 1:
        raise RingllmError(f"--tensor-parallel must be >= 1, got {world}")
    devices = ()
    if args.devices is not None:
        try:
            devices = tuple(int(d) for d in args.devices.split(","))
        except ValueError:
            raise RingllmError(f"--devices {args.devices!r}: CUDA device indices separated by commas, e.g. 0,1") from None
        # NCCL refuses two ranks on one GPU; gloo copies through host memory and lets them share it
        shared = args.tp_backend == "gloo"
        if len(devices) != world or min(devices) < 0 or not shared and len(set(devices)) != world:
            raise RingllmError(f"--devices {args.devices}: {world} {'' if shared else 'different '}device indices "
                               f"for --tensor-parallel {world}" + ("" if shared else " (ranks may share a GPU only "
                                                                   "with --tp-backend gloo)"))
    if args.tp_backend == "nccl" and args.device == "cpu":
        raise RingllmError("--tp-backend nccl needs --device cuda (NCCL runs between GPUs; on cpu the ranks use gloo)")
    if world > 1 and args.resident:
        raise RingllmError(f"--tensor-parallel {world} runs the streaming engine (one process a rank); "
                           "--resident is one process")
    return TensorParallelPlan(world, devices, backend=args.tp_backend)


def draft_kind(args) -> str | None:
    """DraftParams.kind from --draft (ngram or DIR) or --draft-model DIR (the same for a directory)."""
    from ringllm.workers.speculation import DRAFTS

    model = getattr(args, "draft_model", None)
    if model is None:
        return args.draft
    if args.draft is not None:
        raise RingllmError(f"--draft {args.draft} and --draft-model {model}: give one (--draft ngram is prompt "
                           "lookup; --draft DIR is the same as --draft-model DIR)")
    if not (Path(model) / "config.json").is_file():
        raise RingllmError(f"--draft-model {model}: not a model directory (no config.json there)")
    return model if model not in DRAFTS else f"./{model}"   # ./ngram: the directory, not prompt lookup


def with_spec_tokens(sampling, spec_tokens: int):
    return replace(sampling, draft=replace(sampling.draft, spec_tokens=spec_tokens))


def auto_cap(layout, sampling, longest: int, max_new_tokens: int) -> tuple[int, str]:
    """The most --spec-tokens auto may choose for this run (workers.spec_plan.spec_cap)."""
    from ringllm.workers.spec_plan import spec_cap, spec_plan

    spec = spec_plan(sampling)
    context = layout.config.max_position_embeddings
    if spec.draft_layout is not None:
        context = min(context, spec.draft_layout.config.max_position_embeddings)
    return spec_cap(spec.draft_layout is not None, max_new_tokens, context - longest - max_new_tokens,
                    longest + max_new_tokens)


def serve_spec_tokens(layout, sampling, device: str, dtype_name: str, max_context: int):
    """`ringllm serve --spec-tokens auto`: K from the cost of a pass (workers.spec_plan) as for
    generate, capped by the draft's own cap and the context (requests' lengths are not known yet)."""
    import os

    from ringllm.workers.spec_plan import DRAFT_MODEL_CAP, NGRAM_CAP, choose_spec_tokens, pass_cost, spec_plan

    spec = spec_plan(sampling)
    model = spec.draft_layout is not None
    cap = min(DRAFT_MODEL_CAP if model else NGRAM_CAP, max_context - 2)
    cost = pass_cost(layout, 0, device, dtype_name, max_context, None, len(os.sched_getaffinity(0)), spec.draft_layout)
    k, why = choose_spec_tokens(cost, model, (max(1, cap), "the draft's cap, within --max-context"))
    log.info("--spec-tokens auto: %d (%s; planned as if every layer streamed)", k, why)
    return with_spec_tokens(sampling, k)


def resolve_spec_tokens(layout, sampling, resident_layers: int | None, device: str, dtype_name: str, longest: int,
                        max_new_tokens: int, h2d_gbps: float | None = None):
    """--spec-tokens auto: the sampling with K chosen from the cost of a pass (workers.spec_plan),
    logged with its reason. resident_layers: those that stay on the device (None: not known
    before the GPU process starts; planned as if every layer streamed)."""
    import os

    from ringllm.workers.spec_plan import choose_spec_tokens, pass_cost, spec_plan
    from ringllm.workers.speculation import cache_slots

    spec = spec_plan(sampling)
    cost = pass_cost(layout, resident_layers or 0, device, dtype_name, cache_slots(longest, max_new_tokens, sampling),
                     h2d_gbps, len(os.sched_getaffinity(0)), spec.draft_layout)
    k, why = choose_spec_tokens(cost, spec.draft_layout is not None,
                                auto_cap(layout, sampling, longest, max_new_tokens))
    if resident_layers is None:
        why += "; the GPU process decides its resident layers at start: planned as if every layer streamed"
    log.info("--spec-tokens auto: %d (%s)", k, why)
    return with_spec_tokens(sampling, k)


