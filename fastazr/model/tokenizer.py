"""Tokenizer: a `tokenizers` byte-level BPE plus what generation needs besides ids: the chat
template that builds prompts, and the special tokens (EOS/stop, pad, BOS).

Built from a checkpoint's tokenizer.json, or from a GGUF file's vocabulary and merges with the
pre-tokenizer llama.cpp uses for that file's `tokenizer.ggml.pre` type."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from .errors import ModelError, ModelNotFoundError

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _gguf_pre_tokenizer(kind: str):
    """The pre-tokenizer llama.cpp applies for each `tokenizer.ggml.pre` value fastazr supports."""
    if kind in ("default", "gpt2", "gpt-2"):
        return _byte_level(True)
    if kind in ("smollm", "starcoder", "refact"):
        # every digit its own token, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)])
    if kind in ("qwen2", "llama-bpe", "llama3"):
        pattern = _QWEN2_SPLIT if kind == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _byte_level(False)])
    raise ModelError(f"GGUF pre-tokenizer {kind!r} is not supported (supported: smollm, gpt2, qwen2, llama-bpe); "
                     "load the model's Hugging Face directory instead, whose tokenizer.json says it exactly")


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers uses it to find assistant tokens for
    training masks; rendering a prompt keeps the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _template_environment() -> ImmutableSandboxedEnvironment:
    # the same environment transformers renders chat templates in, so prompts match token for token
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> token ids, chat prompts, and the ids generation stops on."""

    def __init__(self, backend: Backend, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, extra_stop_ids: list[int] = ()):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token) if pad_token is not None else self.eos_token_id
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        self.stop_token_ids = list(dict.fromkeys(stops + [int(t) for t in extra_stop_ids]))
        """Every id that ends a completion: the EOS token and the model's generation-config EOS list."""
        self._template = _template_environment().from_string(chat_template) if chat_template else None

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ModelError(f"special token {token!r} is not in the vocabulary: the tokenizer files disagree")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` ([{'role', 'content'}, ...]) under the model's chat template."""
        if self._template is None:
            raise ModelError("this tokenizer has no chat template: load a chat/instruct checkpoint, "
                             "or build prompts with encode()")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     pad_token=self.pad_token or "", **extra)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # the template writes BOS itself where the model wants one
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template), as transformers,
        vLLM and SGLang read them."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token if self.pad_token is not None else self.eos_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, extra_stop_ids: list[int] = ()) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{directory} has no tokenizer.json (fastazr reads fast tokenizers only): "
                                     "save the tokenizer with transformers' save_pretrained to create it")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise ModelError(f"{path} is not a readable tokenizer ({e}): it is corrupt or truncated") from None
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        return cls(backend, template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   _token_text(config.get("pad_token")), extra_stop_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> Tokenizer:
        """From a GGUF file's tokenizer.ggml.* fields (byte-level BPE vocabularies only)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelError(f"{source} has a {kind!r} tokenizer; fastazr builds byte-level BPE ('gpt2') "
                             "tokenizers from GGUF files: load the Hugging Face directory instead")
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre", "default")
        backend = Backend(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              ignore_merges=pre in ("llama-bpe", "llama3")))
        if pre == "qwen2":
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([AddedToken(t, special=k == _CONTROL, normalized=False)
                            for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)])

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        if meta.get("tokenizer.ggml.add_bos_token") and token("bos"):
            bos = token("bos")
            backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
        # end-of-turn tokens (Qwen2.5-Instruct's <|im_end|> beside its EOS <|endoftext|>) stop generation too
        stops = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
                 if f"tokenizer.ggml.{k}_token_id" in meta]
        return cls(backend, meta.get("tokenizer.chat_template"), token("bos"), token("eos"), token("padding"), stops)
