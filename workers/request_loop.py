"""The GPU process's request loop: requests in, one engine step (one weight pass) at a time, events
out. `ringllm generate` and `ringllm serve` run the same loop over the same engine
(workers.engine): a generate run's prompts are its requests from the start and the loop ends when
they are done (then it reports the run's figures in Finished); serve's come as Submit messages
until Shutdown.

    supervisor --Options/PromptPart/Submit/Cancel--> this process --Events (per pass)--> supervisor

Ranks (tensor parallel): every rank must run the same passes over the same requests (each pass
is a chain of collectives). Rank 0 alone reads the requests (the supervisor sends them only
there) and hands each round's messages, and the stop, to the others, at least every IDLE_WAIT_S:
their wait stays far inside the collectives' timeout. After each pass the ranks compare a digest
of what they drew: ranks that sampled apart would feed each other wrong activations from then on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import signal
import time
from dataclasses import replace

from ringllm.checkpoint.errors import RingllmError
from ringllm.shm.channel import Cancel, Channel, Finished, Options, PromptPart, Submit, event_messages, event_rows
from ringllm.workers.engine import Engine, Request, TokenEvent, prompt_requests
from ringllm.workers.sampling import SamplingParams

log = logging.getLogger("ringllm.gpu")
IDLE_WAIT_S = 0.1     # an idle loop looks for requests and Shutdown this often


class RequestTap:
    """The GPU inbox as the InboxReader sees it: Submit, PromptPart, Options and Cancel go to
    `requests` (the loop's), everything else (SlotReady, Shutdown) to the reader as before."""

    def __init__(self, channel: Channel):
        self.channel, self.requests = channel, queue.Queue()

    def receive(self, timeout: float):
        msg = self.channel.receive(timeout)
        if isinstance(msg, (Submit, PromptPart, Cancel, Options)):
            self.requests.put(msg)
            return None
        return msg


def digest(value) -> str:
    """A short hash of what a rank drew in a pass (every tensor-parallel rank must draw alike)."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


class RunFigures:
    """A generate run's figures for Finished: when the first and the last token came and how many
    passes ran, not a list that grows with the run."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first = self.last = None
        self.token_passes = 0             # passes that gave a token (the prefill's last one on)
        self.new_tokens = 0

    def after_pass(self, events: list[TokenEvent]) -> bool:
        tokens = sum(e.token is not None for e in events)
        if not tokens:
            return False
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.token_passes += 1
        self.new_tokens += tokens
        return self.token_passes == 1

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "seconds": time.perf_counter() - self.started,
                "first_token_seconds": self.first - self.started if self.first else None,
                # decode: from the first token (end of prefill) to the last
                "decode_steps": max(0, self.token_passes - 1),
                "decode_seconds": self.last - self.first if self.token_passes > 1 else 0.0}


class RequestLoop:
    def __init__(self, args, engine: Engine, source, sup: Channel, reader, device):
        self.args, self.engine, self.source, self.sup, self.reader = args, engine, source, sup, reader
        self.device, self.tp = device, engine.model.tp
        self.requests: queue.Queue = reader.channel.requests
        self.parts: dict[int, list] = {}      # id -> the prompt's tokens so far (PromptPart messages)
        self.options: dict[int, tuple[Options, list]] = {}   # id -> its Options and logit_bias pairs so far
        self.refused: list = []               # event rows of requests the engine refused at submit
        self.timeout = args.engine.wait_timeout_s
        self.figures = RunFigures()

    # --- generate: the prompts are the requests ------------------------------------------------
    def submit_prompts(self) -> None:
        """Prompt i is request i (engine.prompt_requests: seeded with seed + i)."""
        args = self.args
        for req in prompt_requests(args.prompts, args.max_new_tokens, args.sampling, args.eos_ids):
            self.engine.submit(replace(req, sampling=replace(req.sampling, seed=self.skewed(req.sampling.seed))))

    def skewed(self, seed):
        """Tests (FaultPlan.rank_seed_skew): rank 1 samples with another seed."""
        if self.args.faults.rank_seed_skew and self.args.rank == 1 and seed is not None:
            return seed + 1
        return seed

    # --- serve: requests arrive as messages ----------------------------------------------------
    def take(self, msg) -> None:
        if isinstance(msg, PromptPart):
            self.parts.setdefault(msg.id, []).extend(msg.tokens)
        elif isinstance(msg, Options):
            self.options.setdefault(msg.id, (msg, []))[1].extend(tuple(pair) for pair in msg.logit_bias)
        elif isinstance(msg, Cancel):
            self.engine.cancel(str(msg.id))
        elif isinstance(msg, Submit):
            prompt = self.parts.pop(msg.id, []) + list(msg.tokens)
            for pending in (self.parts, self.options):     # ids rise: older ones are of a Submit that never came
                for stale in [i for i in pending if i < msg.id]:
                    del pending[stale]
            if len(prompt) != msg.prompt_len:      # a protocol bug, not a user error
                raise RingllmError(f"request {msg.id}: {len(prompt)} prompt tokens arrived of {msg.prompt_len}")
            opts, bias = self.options.pop(msg.id, (Options(msg.id, None, False, 0.0, 0.0, [], True), []))
            sampling = SamplingParams(msg.temperature, msg.top_p, msg.top_k, self.skewed(msg.seed),
                                      opts.presence_penalty, opts.frequency_penalty, tuple(bias))
            try:
                self.engine.submit(Request(str(msg.id), tuple(prompt), msg.max_tokens, sampling, tuple(msg.eos_ids),
                                           opts.logprobs, opts.prompt_logprobs, opts.draft))
            except Exception:     # the supervisor checked it first; one request's fault fails it alone
                log.warning("request %d refused", msg.id, exc_info=True)
                self.refused.extend(event_rows(msg.id, None, "error", len(prompt), 0))

    def arrived(self) -> list:
        """Rank 0: the messages that came (waiting up to IDLE_WAIT_S when there is nothing to do)."""
        got = []
        try:
            got.append(self.requests.get(timeout=IDLE_WAIT_S if self.engine.idle() and not self.refused else 0))
            while True:
                got.append(self.requests.get_nowait())
        except queue.Empty:
            pass
        return got

    def next_round(self) -> tuple[list, bool]:
        """This round's messages and whether to stop, alike on every rank."""
        if self.args.rank == 0:
            msgs, stop = self.arrived(), self.reader.shutdown.is_set()
            if self.tp is not None:      # one seed for a request on every rank: they sample alike
                msgs = [replace(m, seed=secrets.randbits(62)) if isinstance(m, Submit) and m.seed is None else m
                        for m in msgs]
        else:
            msgs, stop = [], False
        if self.tp is not None:
            msgs, stop = self.tp.from_rank_0([msgs, stop], self.device)
        return msgs, stop

    # --- the loop -------------------------------------------------------------------------------
    def run(self, generating: bool) -> None:
        """Until Shutdown (serve) or until the prompts are done (generate, which then sends Finished)."""
        if generating:
            self.submit_prompts()
        while True:
            msgs, stop = self.next_round() if not generating else ([], False)
            if stop or generating and self.engine.idle():
                break
            for msg in msgs:
                self.take(msg)
            rows, self.refused = self.refused, []
            forward = False
            if not self.engine.idle():
                served = self.source.stats.groups_served
                events = self.engine.step()
                forward = self.source.stats.groups_served > served
                if forward and not self.after_pass(events):
                    return
                rows += [row for e in events for row in event_rows(
                    int(e.id), e.token, e.finish, e.prompt_tokens, e.completion_tokens, e.logprob, e.prompt_logprobs,
                    e.stats)]
            if self.args.rank == 0 and (rows or forward):
                for msg in event_messages(rows, forward):
                    self.sup.send(msg, timeout=self.timeout)

    def after_pass(self, events: list[TokenEvent]) -> bool:
        """The pass's bookkeeping; False when this rank must stop (it drew apart from rank 0)."""
        source = self.source
        source.tokens += 1
        source.publish(force=True)
        if self.figures.after_pass(events):
            self.first_pass_done()
        if self.args.rank == 1 and source.tokens == self.args.faults.rank_stops_after_tokens:
            os.kill(os.getpid(), signal.SIGSTOP)       # tests: a hung rank
        if self.tp is None:
            return True
        drawn = [[int(e.id), e.token, e.finish] for e in events]
        differ = self.tp.disagreeing(int(digest(drawn), 16) >> 1, self.device)
        if differ and self.args.rank == 0:
            raise RingllmError(f"tensor parallel: rank(s) {differ} sampled other tokens than rank 0; the "
                               "ranks diverged (their activations no longer belong together)")
        if differ:        # rank 0's report ends the run: the others wait for its Shutdown
            self.reader.shutdown.wait(self.timeout)
        return not differ

    def first_pass_done(self) -> None:
        """Overridden by the GPU process to time its first pass."""

    def finished(self, stats: dict) -> None:
        """A generate run's end: rank 0 reports the run's figures (the ranks agreed on every
        pass), then every rank waits for the supervisor's Shutdown."""
        if self.args.rank == 0:
            spec = self.engine.spec.as_dict() if self.engine.spec is not None else None
            self.sup.send(Finished({**self.figures.as_dict(), **stats, "speculation": spec}), timeout=self.timeout)
        self.reader.shutdown.wait(timeout=self.timeout)
