"""Tokenizer (tokenizer.json via `tokenizers`) and chat template (jinja2), read from the model dir."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.llama_config import LlamaConfig


# stands for a message's content while the template is rendered a second time (private-use
# characters: no template trims or rewrites them)
CONTENT_MARK = "\ue000ringllm-content-{}\ue001"
CONTENT_MARK_RE = re.compile("\ue000ringllm-content-(\\d+)\ue001")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RingllmError(f"{path}: cannot be read as JSON ({err})") from None


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} objects
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextCodec:
    """Encodes prompts (optionally through the chat template) and decodes tokens incrementally."""

    def __init__(self, model_dir: Path, cfg: LlamaConfig):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise RingllmError(f"{tok_path}: not found (ringllm needs the fast tokenizer file)")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as err:  # tokenizers raises a plain Exception on bad files
            raise RingllmError(f"{tok_path}: cannot be loaded ({err})") from None
        tcfg = _read_json(model_dir / "tokenizer_config.json")
        gen = _read_json(model_dir / "generation_config.json")
        self.bos_token = _token_text(tcfg.get("bos_token"))
        self.eos_token = _token_text(tcfg.get("eos_token"))
        template_file = model_dir / "chat_template.jinja"
        self.chat_template = (template_file.read_text() if template_file.is_file()
                              else tcfg.get("chat_template"))
        if isinstance(self.chat_template, list):   # named templates: take "default"
            self.chat_template = next((t["template"] for t in self.chat_template
                                       if t.get("name") == "default"), None)
        eos = set(cfg.eos_token_ids)
        gen_eos = gen.get("eos_token_id")
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if self.eos_token is not None and self.tokenizer.token_to_id(self.eos_token) is not None:
            eos.add(self.tokenizer.token_to_id(self.eos_token))
        self.eos_ids = tuple(sorted(eos))

    def render_messages(self, messages: list[dict], without_template: str) -> str:
        """A conversation through the checkpoint's chat template, in jinja2's sandbox, ready for
        the assistant's turn. without_template: what to tell a user whose model has none."""
        if not self.chat_template:
            raise RingllmError(f"this model has no chat template (tokenizer_config.json); {without_template}")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as err:
            raise RingllmError(f"chat template failed: {err}") from None

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat:
            return self.encode_messages([{"role": "user", "content": text}], "use --no-chat")
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def encode_messages(self, messages: list[dict], without_template: str) -> list[int]:
        """A conversation through the chat template, tokenized. Message content is text: a control
        token's string inside it ('<|im_end|>') becomes the tokens of those characters, never the
        control token; only the template writes control tokens (and any BOS it wants)."""
        pieces = self._template_and_content(messages, without_template)
        specials = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        special = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")
        ids, run = [], []     # run: text since the last control token, tokenized as one piece, as
                              # the tokenizer itself does between the special tokens it splits at

        def end_run():
            if run:
                ids.extend(self._text_tokenizer.encode("".join(run), add_special_tokens=False).ids)
                run.clear()

        for text, from_template in pieces:
            if not from_template:
                run.append(text)
                continue
            at = 0
            for match in special.finditer(text):
                run.append(text[at:match.start()])
                end_run()
                ids.append(specials[match.group()])
                at = match.end()
            run.append(text[at:])
        end_run()
        return ids

    def _template_and_content(self, messages: list[dict], without_template: str) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, written by the template) pieces: the template is
        rendered once with the content and once with a mark in place of each content, and the
        marks say where the content lies (trimmed, when the template trims it)."""
        rendered = self.render_messages(messages, without_template)
        marked = self.render_messages([{**m, "content": CONTENT_MARK.format(i)} for i, m in enumerate(messages)],
                                      without_template)
        parts = CONTENT_MARK_RE.split(marked)     # template text, content index, template text, ...
        pieces, at = [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not rendered.startswith(part, at):
                    break
                pieces.append((part, True))
                at += len(part)
                continue
            content, after = messages[int(part)]["content"], parts[k + 1]
            found = next((c for c in (content, content.strip()) if rendered.startswith(c + after, at)), None)
            if found is None:
                break
            pieces.append((found, False))
            at += len(found)
        if at != len(rendered) or len(pieces) != len(parts):
            raise RingllmError("the chat template changes message content beyond trimming it, so its control "
                               "tokens cannot be told from the content's")
        return pieces

    @functools.cached_property
    def _text_tokenizer(self):
        """The tokenizer with special-token matching off: text that spells a special token is text."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.encode_special_tokens = True
        return tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns tokens, one at a time, into newly printable text, holding back split UTF-8 sequences.
    Constant work a token: it decodes a window of a few ids (prefix_offset..end, as vLLM and
    transformers' streamer do), never the whole output. The window's first ids (up to read_offset)
    were printed already; they give the new ids their context (a leading space, a split byte)."""

    MAX_HELD = 8    # ids held back at most: no character is longer than 4 bytes; what is still
                    # incomplete after this many is invalid UTF-8, printed as U+FFFD

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.read_offset = codec, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        if len(self.ids) - self.read_offset < self.MAX_HELD:
            text = self.codec.decode(self.ids)
            if text.endswith("\ufffd"):   # an incomplete multi-byte character: wait for the next token
                return ""
        return self.flush()

    def flush(self) -> str:
        """The text of every id pushed so far not yet returned (at the end: held-back bytes as U+FFFD)."""
        printed = self.codec.decode(self.ids[:self.read_offset])
        text = self.codec.decode(self.ids)
        self.ids, self.read_offset = self.ids[self.read_offset:], len(self.ids) - self.read_offset
        return text[len(printed):]
