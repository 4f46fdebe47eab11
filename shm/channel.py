"""The message channel: one POSIX message queue per receiver, msgpack-encoded typed messages.

Kernel defaults for non-root users are 10 messages a queue and 8 KiB a message, and all queues of
a user share RLIMIT_MSGQUEUE (800 KiB by default: only nine queues of 10 x 8 KiB). So our queues
hold 10 messages of at most 1 KiB, messages are a few integers (files travel as an index into a
table each process got at start; prompts go as process arguments), and the coordinator never
blocks on a full queue (`try_send` + its own outbox). No message grows with the length of a run
([P12]); a field whose size a run decides is bounded by design, each kind its own way:
- requests' prompts and options, and an engine step's events, travel as several messages
  under the cap (`submit_messages`, `option_messages`, `event_rows`, `event_messages`);
- a `Fatal` cuts its text to fit, by encoded bytes (`fit_text`);
- the reports whose dicts a run fills (`Ready`'s info, `Finished`'s and `Stats`' stats: fixed
  keys, and a speculation table of at most spec_tokens + 1 rows) travel IN_PARTS: `Channel.send`
  cuts one that does not fit into `Part` messages, `Channel.receive` puts it back together;
- everything else is a fixed number of integers.

Wire format: msgpack array [PROTOCOL_VERSION, kind, field0, field1, ...] in dataclass field order.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import msgpack
import posix_ipc

PROTOCOL_VERSION = 5
QUEUE_MESSAGES = 10
MESSAGE_BYTES = 1024

_KINDS: dict[int, type] = {}


def message(kind: int):
    def register(cls):
        cls = dataclass(frozen=True)(cls)
        assert kind not in _KINDS
        cls.KIND = kind
        _KINDS[kind] = cls
        return cls
    return register


# --- children -> supervisor ------------------------------------------------------------------
@message(1)
class Ready:
    IN_PARTS = True           # info holds the device's name
    role: str
    index: int
    info: dict = field(default_factory=dict)


@message(2)
class Fatal:
    """A child's last word. The text is cut here to fit the message cap, by encoded bytes,
    keeping its start and its end, so any sender may pass any text (a report must never fail
    on the path or error it names)."""
    role: str
    index: int
    text: str

    def __post_init__(self):
        empty = len(msgpack.packb([PROTOCOL_VERSION, self.KIND, self.role, self.index, ""], use_bin_type=True))
        # an empty string's header is 1 byte, a longer one's up to 3 (str16)
        object.__setattr__(self, "text", fit_text(self.text, MESSAGE_BYTES - empty - 2))


def fit_text(text: str, room: int, marker: str = " ... ") -> str:
    """`text` in at most `room` UTF-8 bytes: the start and the end, the middle cut out."""
    # lone surrogates (file names that are not UTF-8) cannot be encoded: spell them out
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    data = text.encode("utf-8")
    if len(data) <= room:
        return text
    keep = room - len(marker.encode("utf-8"))
    head, tail = keep // 3, keep - keep // 3
    # "ignore" drops a character cut in half at either edge, so the result stays within room
    return data[:head].decode("utf-8", "ignore") + marker + data[len(data) - tail:].decode("utf-8", "ignore")


@message(4)
class Finished:
    IN_PARTS = True           # the GPU process's report: fixed keys and the speculation table
    stats: dict


@message(5)
class Stats:
    IN_PARTS = True
    role: str
    stats: dict


@message(7)
class Part:
    """A piece of a message of an IN_PARTS type that does not fit one (`frames`); `last` ends
    it. `sender` (the sending process's pid) keeps apart the pieces of senders that share a
    queue (tensor-parallel ranks); one sender's pieces come in order (blocking sends, one queue)."""
    sender: int
    last: bool
    data: bytes


PART_HEADER = 16     # a Part's fields but its data: the array, version, kind, pid (< 2**32), last, a bin32 length


class PartedMessages:
    """Puts Part messages back together, per sender (Channel.receive)."""

    def __init__(self):
        self.pending: dict[int, list[bytes]] = {}

    def add(self, part: Part):
        """The whole message once its last part arrived, else None."""
        pieces = self.pending.setdefault(part.sender, [])
        pieces.append(part.data)
        if not part.last:
            return None
        del self.pending[part.sender]
        return decode(b"".join(pieces))


# --- supervisor -> children ------------------------------------------------------------------
@message(10)
class Shutdown:
    pass


@message(11)
class LoaderRestarted:
    index: int
    epoch: int                # the new process's incarnation number (1 for the first restart)


@message(12)
class StatsRequest:
    pass


# --- `ringllm serve`: supervisor <-> GPU process --------------------------------------------
# Requests travel by a small integer id the supervisor assigns (supervisor.serving), so that a
# pass's events stay small. A prompt longer than one message goes first as PromptPart messages,
# then the Submit with its last part; one sender (the supervisor, under a lock) and one queue keep
# them in order, so the GPU process puts them together by id ([P12]: every message under the cap).
@message(13)
class PromptPart:
    id: int
    tokens: list


@message(14)
class Submit:
    """A request joins the GPU process's engine (workers.engine.Engine.submit); `tokens`
    ends the prompt of prompt_len tokens whose start came in PromptPart messages."""
    id: int
    prompt_len: int
    tokens: list
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    eos_ids: list


@message(15)
class Cancel:
    id: int


@message(16)
class Options:
    """What a request asks beyond Submit's fields, sent before its Submit (several when logit_bias
    is long: their pairs add up): logprobs (top alternatives, None: no logprobs), the prompt's
    logprobs too (echo), OpenAI's penalties, logit_bias as [token, bias] pairs, and whether the
    request uses the engine's draft (a request may decline it)."""
    id: int
    logprobs: int | None
    prompt_logprobs: bool
    presence_penalty: float
    frequency_penalty: float
    logit_bias: list
    draft: bool = True


@message(6)
class Events:
    """One engine step's TokenEvents as rows [id, token, finish, prompt_tokens, completion_tokens,
    logprob, prompt_logprobs, stats] (event_rows); a step too big for one message comes as several,
    `last` set on its final one. forward: the step ran a weight pass (a step that only drops
    cancelled requests does not)."""
    forward: bool
    last: bool
    events: list


LOGIT_BIAS_PAIRS = 50      # [token, bias] pairs an Options message carries (15 bytes each at most)


def option_messages(id: int, sampling, logprobs: int | None, prompt_logprobs: bool, draft: bool = True) -> list:
    """A request's Options messages: none when it asks for nothing beyond Submit's fields."""
    bias = [list(pair) for pair in sampling.logit_bias]
    if logprobs is None and not prompt_logprobs and not sampling.adjusts_logits and draft:
        return []
    return [Options(id, logprobs, prompt_logprobs, float(sampling.presence_penalty),
                    float(sampling.frequency_penalty), bias[i:i + LOGIT_BIAS_PAIRS], draft)
            for i in range(0, max(1, len(bias)), LOGIT_BIAS_PAIRS)]


def submit_messages(id: int, prompt: list, max_tokens: int, sampling, eos_ids: list,
                    logprobs: int | None = None, prompt_logprobs: bool = False, draft: bool = True) -> list:
    """A request as Options and PromptPart messages and the Submit that ends it, each under the cap."""
    def submit(tokens):
        return Submit(id, len(prompt), tokens, max_tokens, float(sampling.temperature), float(sampling.top_p),
                      int(sampling.top_k), sampling.seed, list(eos_ids))
    room = (MESSAGE_BYTES - len(encode(submit([])))) // 5 - 1   # token ids take 5 bytes at most
    header = len(encode(PromptPart(id, [])))
    part = (MESSAGE_BYTES - header) // 5 - 1
    if room < 1:
        raise ValueError(f"{len(eos_ids)} EOS ids do not fit a Submit message")
    head, last = prompt[:max(0, len(prompt) - room)], prompt[max(0, len(prompt) - room):]
    return (option_messages(id, sampling, logprobs, prompt_logprobs, draft)
            + [PromptPart(id, head[i:i + part]) for i in range(0, len(head), part)] + [submit(last)])


# A logprob entry [token, logprob, [[token, logprob] x top <= 20]] takes at most 325 bytes, so a row
# of PROMPT_ENTRIES entries stays well under the cap; a long prompt's logprobs go as many rows.
PROMPT_ENTRIES = 2


def event_rows(id: int, token, finish, prompt_tokens: int, completion_tokens: int, logprob=None,
               prompt_logprobs=(), stats=None) -> list:
    """One TokenEvent (workers.engine) as Events rows: the prompt's logprobs first, in rows of
    PROMPT_ENTRIES entries (id, nothing else), then the event's own row unless it only carried those.
    stats: the finish event's RequestStats (passes, drafted, accepted: three integers)."""
    rows = [[id, None, None, 0, 0, None, list(prompt_logprobs[i:i + PROMPT_ENTRIES]), None]
            for i in range(0, len(prompt_logprobs), PROMPT_ENTRIES)]
    if token is not None or finish is not None or not rows:
        rows.append([id, token, finish, prompt_tokens, completion_tokens, logprob, [],
                     list(stats) if stats is not None else None])
    return rows


def event_messages(rows: list, forward: bool) -> list:
    """A step's event rows in as many Events messages as the cap needs (at least one), packed by
    their encoded size (a row with logprobs is ten times one without)."""
    room = MESSAGE_BYTES - len(encode(Events(forward, False, []))) - 2   # the list's header grows to 3 bytes
    parts, size = [[]], 0
    for row in rows:
        n = len(msgpack.packb(row, use_bin_type=True))
        if parts[-1] and size + n > room:
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += n
    return [Events(forward, i == len(parts) - 1, part) for i, part in enumerate(parts)]


# --- coordinator <-> loaders -----------------------------------------------------------------
@message(20)
class ReadJob:
    job: int
    slot: int
    generation: int
    layer: int                # what the slot holds for this generation (for error reports)
    file: int                 # index into the file table the loader got at start
    file_offset: int
    length: int
    slot_offset: int
    needed: int
    epoch: int = 0            # the loader incarnation it is meant for: an older one's jobs are skipped


@message(21)
class ChunkDone:
    job: int
    loader: int
    nbytes: int
    seconds: float
    direct: bool
    skipped: bool = False     # the slot had left (LOADING, generation) before the read: nothing written
    fallback: bool = False    # read buffered although the file accepted O_DIRECT at open


# --- coordinator <-> GPU process -------------------------------------------------------------
# Tensor parallel: N GPU processes ("ranks") share the ring; each names itself in `rank`. A rank
# field comes last with a default, so a sender that leaves it out (one GPU process) is rank 0.
@message(30)
class Want:
    step: int                 # pass * num_layers + layer the GPU process will copy next
    compute_step: int         # where compute is now (this rank's)
    rank: int = 0             # which GPU process asks


@message(31)
class SlotReady:
    step: int
    layer: int
    slot: int
    generation: int


@message(32)
class Release:
    step: int
    slot: int
    generation: int
    compute_step: int
    rank: int = 0             # which GPU process lets go of the slot (each rank releases once)


@message(34)
class ResidentLayers:
    """Layers 0..count-1 stay on the GPU for the whole run: the ring never needs them."""
    count: int


@message(33)
class Mark:
    """The timed part of a run starts: the coordinator reports its counters since this point too."""


def _pack(msg) -> bytes:
    payload = [PROTOCOL_VERSION, msg.KIND, *(getattr(msg, f.name) for f in dataclasses.fields(msg))]
    return msgpack.packb(payload, use_bin_type=True)


def encode(msg) -> bytes:
    data = _pack(msg)
    if len(data) > MESSAGE_BYTES:      # [P12] every sender keeps to the cap (module docstring: how)
        raise ValueError(f"{type(msg).__name__} message of {len(data)} bytes exceeds {MESSAGE_BYTES}")
    return data


def frames(msg) -> list[bytes]:
    """What goes on the wire for msg: its encoding, or for an IN_PARTS type too big for one
    message, Part messages of at most MESSAGE_BYTES each."""
    data = _pack(msg)
    if len(data) <= MESSAGE_BYTES or not getattr(msg, "IN_PARTS", False):
        return [encode(msg)]
    room = MESSAGE_BYTES - PART_HEADER      # [P12] a report of any size, in pieces under the cap
    pieces = [data[i:i + room] for i in range(0, len(data), room)]
    return [encode(Part(os.getpid(), i == len(pieces) - 1, piece)) for i, piece in enumerate(pieces)]


def decode(data: bytes):
    version, kind, *fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if version != PROTOCOL_VERSION:
        raise ValueError(f"message protocol {version}, expected {PROTOCOL_VERSION}")
    return _KINDS[kind](*fields)


class Channel:
    """One queue end. The owner (supervisor) creates and unlinks; everyone else opens by name."""

    def __init__(self, name: str, create: bool = False, stop_requested=None):
        """stop_requested (children: process_setup.stop_requested) ends a blocked send once the
        supervisor asked the process to stop: posix_ipc turns the signal inside the wait into
        SignalError and drops the SystemExit its handler raised."""
        self.name, self.stop_requested = name, stop_requested
        self.parted = PartedMessages()
        flags = posix_ipc.O_CREX if create else 0
        self.queue = posix_ipc.MessageQueue(name, flags, mode=0o600, max_messages=QUEUE_MESSAGES,
                                            max_message_size=MESSAGE_BYTES)

    def send(self, msg, timeout: float | None = 5.0) -> None:     # [P16] always with a deadline
        """Blocking send with a deadline (for each part of a message sent in parts): raises
        posix_ipc.BusyError if the receiver is stuck."""
        for data in frames(msg):
            self._send(data, timeout)

    def _send(self, data: bytes, timeout: float | None) -> None:
        while True:
            try:
                self.queue.send(data, timeout=timeout)
                return
            except posix_ipc.SignalError:
                # A SIGTERM from the supervisor lands here while the receiver is gone and its queue
                # full (a loader reporting a chunk after the coordinator stopped): stop, don't wait.
                if self.stop_requested is not None and self.stop_requested():
                    raise SystemExit(143) from None
                continue   # a signal whose handler did not ask us to stop: try again

    def try_send(self, msg) -> bool:
        try:
            self.queue.send(encode(msg), timeout=0)
            return True
        except posix_ipc.BusyError:
            return False

    def receive(self, timeout: float):
        """The next message (a message sent in parts once all its parts came), or None after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, _ = self.queue.receive(timeout=max(0.0, deadline - time.monotonic()))
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                # SignalError: a signal arrived while waiting; Python runs its handler right after this
                return None
            msg = decode(data)
            if not isinstance(msg, Part):
                return msg
            whole = self.parted.add(msg)
            if whole is not None:
                return whole

    def close(self) -> None:
        try:
            self.queue.close()
        except posix_ipc.ExistentialError:
            pass


class Outbox:
    """Messages waiting for room in a queue; flushed without ever blocking ([P12]: the coordinator
    never blocks on a full queue)."""

    def __init__(self, channel: Channel):
        self.channel, self.pending = channel, []

    def put(self, msg) -> None:
        self.pending.append(msg)
        self.flush()

    def flush(self) -> None:
        while self.pending and self.channel.try_send(self.pending[0]):
            self.pending.pop(0)
