"""A GGUF file's special tokens (bos, eos, padding, unknown, whether BOS/EOS are added), applied
to the tokenizer and model transformers load from it.

transformers' GGUF tokenizer conversion swaps bos and eos for Llama-family files (eos becomes
the BOS token), leaves padding unset and adds a BOS the file says not to add. An export then
stops generation at the wrong token. The GGUF metadata is the authority: ``apply`` makes the
tokenizer (tokenizer_config.json, special_tokens_map.json, tokenizer.json's post-processor) and
the model's config and generation config say what it says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROLES = ("bos", "eos", "pad", "unk")
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}


@dataclasses.dataclass
class SpecialTokens:
    ids: dict[str, int]  # role -> id, for the roles the file names
    tokens: dict[str, str]  # role -> token text
    add_bos: bool | None = None
    add_eos: bool | None = None


def read(path: str | Path) -> SpecialTokens:
    """The special tokens a GGUF file's ``tokenizer.ggml.*`` metadata names."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    vocab = fields.get("tokenizer.ggml.tokens")

    def scalar(key):
        field = fields.get(key)
        return None if field is None else field.contents()

    ids, tokens = {}, {}
    for role, key in _ID_KEYS.items():
        value = scalar(key)
        if value is None:
            continue
        ids[role] = int(value)
        if vocab is not None:
            tokens[role] = vocab.contents(int(value))
    add_bos, add_eos = (
        scalar("tokenizer.ggml.add_bos_token"),
        scalar("tokenizer.ggml.add_eos_token"),
    )
    return SpecialTokens(
        ids,
        tokens,
        None if add_bos is None else bool(add_bos),
        None if add_eos is None else bool(add_eos),
    )


def apply(special: SpecialTokens, tokenizer, model) -> None:
    """Make a transformers tokenizer and model agree with ``special`` (in place)."""
    for role, text in special.tokens.items():
        setattr(tokenizer, f"{role}_token", text)
    for flag, value in (("add_bos_token", special.add_bos), ("add_eos_token", special.add_eos)):
        # Llama/Gemma fast tokenizers rebuild tokenizer.json's post-processor from these
        if value is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, value)
    generation = getattr(model, "generation_config", None)
    for role, token_id in special.ids.items():
        setattr(model.config, f"{role}_token_id", token_id)
        if generation is not None and role != "unk":
            setattr(generation, f"{role}_token_id", token_id)
