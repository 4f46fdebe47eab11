"""Tokenizer (tokenizer.json via `tokenizers`) and chat template (jinja2), read from the model dir."""
from __future__ import annotations

import json
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.llama_config import LlamaConfig


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

    def render_chat(self, user_text: str) -> str:
        """One user turn through the chat template (`ringllm generate`)."""
        return self.render_messages([{"role": "user", "content": user_text}], "use --no-chat")

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
            # The template already writes any BOS token it wants; add no more specials.
            return self.tokenizer.encode(self.render_chat(text), add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing token list into newly printable text, holding back split UTF-8 sequences."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.printed = codec, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):   # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new
