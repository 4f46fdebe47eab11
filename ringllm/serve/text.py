"""Prompt text for the endpoints: the chat template over a message list, incremental detokenizing
with stop strings held back until they cannot match."""
from __future__ import annotations

from ringllm.checkpoint.text import StreamDecoder, TextCodec

ROLES = ("system", "user", "assistant", "tool", "developer")


def message_text(content) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are understood."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError("content must be a string or a list of text parts")


def render_chat(codec: TextCodec, messages: list[dict]) -> str:
    """The checkpoint's chat template over the whole conversation."""
    return codec.render_messages(messages, "use /v1/completions")


class StopTextStream:
    """Decoded text of a request's tokens with its stop strings applied: push() returns the text
    that can be sent now; text that might be the start of a stop string is held back."""

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.decoder = StreamDecoder(codec)
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token)
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """At the end of a request: what was held back (no stop string can complete now)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
