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


def chat_ids(codec: TextCodec, messages: list[dict]) -> list[int]:
    """The checkpoint's chat template over the whole conversation, tokenized; content is text."""
    return codec.encode_messages(messages, "use /v1/completions")


class StopMatcher:
    """Stop strings over text that arrives in pieces: push() returns the text that can be released
    now, up to the first place where a stop string ends (cut before that stop string, the longest
    one when several end there), whatever the pieces. Linear time: one step per character per stop
    string (Knuth-Morris-Pratt), and it holds back only the end of the text that is the start of
    a stop string, so less than the longest stop string."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.fallback = [_prefix_function(s) for s in self.stop]
        self.matched = [0] * len(self.stop)    # per stop: the longest end of the text that starts it
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        released = len(self.held)       # a stop found in text[i] cuts the held + text at
        self.held += text
        for i, char in enumerate(text):
            ended = 0
            for k, stop in enumerate(self.stop):
                m = self.matched[k]
                while m and stop[m] != char:
                    m = self.fallback[k][m - 1]
                m = m + 1 if stop[m] == char else 0
                if m == len(stop):
                    ended = max(ended, m)
                    m = self.fallback[k][m - 1]
                self.matched[k] = m
            if ended:
                self.stopped = True
                out, self.held = self.held[:released + i + 1 - ended], ""
                return out
        keep = max(self.matched, default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """At the end: what was held back (no stop string can complete now)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def _prefix_function(s: str) -> list[int]:
    """KMP: for each i, the length of the longest proper prefix of s[:i+1] that is also its suffix."""
    pi = [0] * len(s)
    for i in range(1, len(s)):
        k = pi[i - 1]
        while k and s[k] != s[i]:
            k = pi[k - 1]
        pi[i] = k + 1 if s[k] == s[i] else k
    return pi


class StopTextStream:
    """Decoded text of a request's tokens with its stop strings applied: push() returns the text
    that can be sent now; text that might be the start of a stop string is held back."""

    def __init__(self, codec: TextCodec, stop: list[str]):
        self.decoder = StreamDecoder(codec)
        self.matcher = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self.matcher.push(self.decoder.push(token))

    def flush(self) -> str:
        """At the end of a request: what was held back, the decoder's incomplete bytes included
        (as U+FFFD), with the stop strings still applied to them."""
        if self.stopped:
            return ""
        return self.matcher.push(self.decoder.flush()) + self.matcher.flush()
