"""Log-probabilities in OpenAI's two shapes: /v1/completions' (tokens, token_logprobs,
top_logprobs, text_offset) and /v1/chat/completions' (content: token, logprob, bytes,
top_logprobs). The numbers are the engine's (workers.engine.TokenLogprob): the model's raw
log-softmax, before logit_bias, penalties and temperature (as vLLM reports by default)."""
from __future__ import annotations

from ringllm.checkpoint.text import TextCodec
from ringllm.workers.engine import TokenLogprob


def token_text(codec: TextCodec, token: int) -> str:
    """A token on its own, special tokens spelled out (logprobs name every token they score)."""
    return codec.tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(codec: TextCodec, entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The legacy shape; text_offset: where the first token's text starts in the choice's text
    (each token's offset is the previous one's plus its text's length, as vLLM counts)."""
    tokens = [token_text(codec, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            # a prompt's first token has no logprob, hence no alternatives either
            "top_logprobs": [None if e.logprob is None else {token_text(codec, t): v for t, v in e.top}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(codec: TextCodec, entries: list[TokenLogprob]) -> dict:
    def one(token: int, logprob: float) -> dict:
        text = token_text(codec, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in entries]}
