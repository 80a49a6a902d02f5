"""Tokenizer + chat template of a Hugging Face model directory, without transformers.

tokenizer.json is run by the `tokenizers` library; the chat template (tokenizer_config.json "chat_template",
else chat_template.jinja, else chat_template.json) is rendered by a sandboxed jinja2 environment set up like
transformers' (trim_blocks, lstrip_blocks, loopcontrols, a non-escaping tojson, raise_exception), and the text is
encoded without added special tokens, as apply_chat_template does."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from runtime.config import read_json
from runtime.errors import ModelLoadError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _read_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").is_file():
        template = read_json(model_dir / "chat_template.json").get("chat_template")
        return template if isinstance(template, str) else None
    return None


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, special_tokens: dict[str, str]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token/eos_token/... -> text, as the template sees them

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: file not found (a fast-tokenizer tokenizer.json is required)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from e
        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(tokenizer, _read_chat_template(model_dir, config), special)

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template', "
                             "chat_template.jinja or chat_template.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of a token given by its text (special tokens included); KeyError if it is not one token."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a token of this tokenizer")
        return token_id

    def single_token_id(self, text: str) -> int:
        """Id of `text` when it encodes to exactly one token (e.g. an answer word); ValueError otherwise."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} encodes to {len(ids)} tokens {ids}; answer tokens must be single tokens")
        return ids[0]


class IncrementalDetokenizer:
    """Text deltas of a growing token list; holds back a trailing partial UTF-8 character. `prefix_ids` (a forced
    answer prefix) are decoded with the tokens that follow them, so the first delta carries their text."""

    def __init__(self, tokenizer: ChatTokenizer, prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta

    def flush(self) -> str:
        """Whatever push() held back (a partial character at the end decodes to U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta
