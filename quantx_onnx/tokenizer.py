"""The export folder's tokenizer (tokenizer.json) and chat template, without transformers."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{folder}: no tokenizer.json (pass token ids, or export with one)")
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.chat_template = None
        self.special: dict[str, str] = {}
        config = folder / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            self.chat_template = data.get("chat_template")
            for key in ("bos_token", "eos_token"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    self.special[key] = value
        template = folder / "chat_template.jinja"
        if self.chat_template is None and template.is_file():
            self.chat_template = template.read_text()
        processor = folder / "chat_template.json"  # a processor's (e.g. LLaVA's), older layout
        if self.chat_template is None and processor.is_file():
            self.chat_template = json.loads(processor.read_text()).get("chat_template")

    @property
    def takes_parts(self) -> bool:
        """Whether the chat template reads a message's content as typed parts (a processor's
        template: ``{"type": "image"}``, ``{"type": "text", "text": ...}``)."""
        return bool(self.chat_template) and "'type'" in self.chat_template

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (<|im_start|>, <|endoftext|>, ...)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        eos = self.special.get("eos_token")
        return self.token_id(eos) if eos else None

    def chat_prompt(self, user_message: str, system: str | None = None, images: int = 0) -> str:
        """The prompt text for one user turn, rendered with the model's chat template
        (plain text when the tokenizer has none); ``images`` image parts go before the text
        where the template takes typed parts."""
        if not self.chat_template:
            return user_message
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag()]
        )
        content = user_message
        if self.takes_parts:
            content = [{"type": "image"}] * images + [{"type": "text", "text": user_message}]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, **self.special
        )


def _generation_tag():
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text for
        training masks with it): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag
