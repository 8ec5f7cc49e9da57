"""The serving tokenizer: the model's ``tokenizer.json`` and chat template, without transformers.

transformers' tokenizer classes are thin wrappers over the ``tokenizers`` library plus a Jinja
chat template, but importing them costs about a second of every start. This class does what
the engine needs — render the chat template, encode, decode — with the same two libraries
transformers itself uses (``tokenizers``, ``jinja2`` in a sandbox), reading the files
``save_pretrained`` writes. Token ids match ``PreTrainedTokenizerFast`` exactly
(tests/test_decoder.py).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

#: transformers' training-only tag (marks assistant tokens for loss masks); rendering ignores it.
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class ChatTokenizer:
    padding_side = "left"

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        config_file = self.folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.special = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(key) is not None
        }
        template_file = self.folder / "chat_template.jinja"
        template = (
            template_file.read_text() if template_file.exists() else config.get("chat_template")
        )
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ValueError(f"{self.folder} has no chat template")
        self.chat_template: str = template
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    # -- the attributes the engine reads --------------------------------------------------------

    @property
    def eos_token(self) -> str | None:
        return self.special.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special.get("pad_token")

    @pad_token.setter
    def pad_token(self, value: str) -> None:
        self.special["pad_token"] = value

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- encoding -------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same environment transformers renders chat templates in (templates come from
        # model repositories: untrusted code, hence the sandbox).
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(_GENERATION_TAG.sub("", self.chat_template))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: Any,
    ) -> list[int] | str:
        text = self.render(list(messages), add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_spaces else text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
        return value.get("content")
    return value


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (for tokenizers configured to want it)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
