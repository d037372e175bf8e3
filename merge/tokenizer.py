"""The output tokenizer: read input tokenizers, extend one, write it, add a chat template.

The donor is ``tokenizer_source`` (``base``: the base model, else the first model; ``union``:
the base's tokenizer extended with the other models' tokens; or a model reference). Tokenizers
are read as fast ``tokenizers.Tokenizer`` objects: ``tokenizer.json`` directly (header-like
metadata, cheap), other formats (SentencePiece, WordPiece) converted by transformers. A union
tokenizer is the donor's ``tokenizer.json`` plus added tokens (``extend_tokenizer``), written
next to the donor's other tokenizer files, whose ``added_tokens_decoder`` and
``added_tokens.json`` learn the new tokens too (so transformers 4.x and 5.x load it the same).
``chat_template`` is a named template (``chatml``, ``llama3``, ``alpaca``, ``mistral``, ``exaone``),
``auto`` (the template most of the input models use) or a literal Jinja template; it is written
both to ``tokenizer_config.json`` and ``chat_template.jinja``.

What it does not do: decide which tokens the output has or where their embedding rows come
from (``merge.vocab``), or retrain/merge BPE merges (new tokens are added tokens).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from merge.errors import CheckpointError
from merge.links import TOKENIZER_FILES, inside
from merge.settings import remote_code

VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
        "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # EXAONE (LG AI Research): a system turn always opens the conversation (empty if none is
    # given); each turn is "[|role|]content", a user turn ends with a newline, the others with
    # "[|endofturn|]" and a newline.
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
        "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def read_chat_template(directory: Path) -> str | None:
    """A model's chat template (chat_template.jinja, else tokenizer_config.json); a file linked
    outside ``directory`` is refused (``merge.links``)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return inside(jinja, directory).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{jinja}: not UTF-8 text (byte {e.start}); fix or remove the chat template"
            ) from None
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:  # a broken config has no template to offer; the donor's is checked on its own
            value = _read_config(inside(cfg, directory)).get("chat_template")
        except CheckpointError:
            return None
        return value if isinstance(value, str) else None
    return None


def _read_config(path: Path) -> dict[str, Any]:
    """A tokenizer JSON config as a dict; CheckpointError naming the file when it is not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_tokenizer(
    donor: Path, spec: str | None, model_dirs: Iterable[Path], built: bool
) -> str | None:
    """Read now what ``write_tokenizer`` will read after the merge: the chat template
    (``spec``) and the donor's configs that it updates; raises CheckpointError if unusable.
    Returns the resolved template."""
    template = resolve_template(spec, model_dirs)
    if template is not None or built:
        for name in ("tokenizer_config.json", "added_tokens.json"):
            if (donor / name).is_file():
                _read_config(donor / name)
    return template


def resolve_template(spec: str | None, model_dirs: Iterable[Path]) -> str | None:
    """The Jinja text for a recipe's chat_template value (None: keep the donor's)."""
    if spec is None:
        return None
    if spec == "auto":
        found = Counter(t for d in model_dirs if (t := read_chat_template(d)))
        return found.most_common(1)[0][0] if found else None
    return TEMPLATES.get(spec, spec)


def has_tokenizer(directory: Path) -> bool:
    """True when ``directory`` holds tokenizer files that ``read_tokenizer`` can use."""
    return any((directory / n).is_file() for n in VOCAB_FILES)


def read_tokenizer(directory: Path) -> Tokenizer:
    """A model's tokenizer as a fast ``tokenizers.Tokenizer``; ValueError (one line) if it
    cannot be read. ``tokenizer.json`` is parsed directly; other formats go through
    transformers' conversion (local files only; ``--trust-remote-code`` lets it run the
    folder's tokenizer code)."""
    path = directory / "tokenizer.json"
    try:
        if path.is_file():
            return Tokenizer.from_file(str(path))
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote_code())
        backend = getattr(loaded, "backend_tokenizer", None)
    except Exception as e:  # a corrupt file or a format transformers cannot convert
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(first) from None
    if not isinstance(backend, Tokenizer):
        raise ValueError("transformers cannot convert it to a fast tokenizer")
    return backend


def extend_tokenizer(tokenizer: Tokenizer, tokens: Sequence[AddedToken]) -> Tokenizer:
    """A copy of ``tokenizer`` with ``tokens`` added (each keeps its ``special`` flag, so
    special tokens are never split); ``tokenizer`` itself is unchanged."""
    out = Tokenizer.from_str(tokenizer.to_str())
    out.add_tokens(list(tokens))
    return out


def _added_entry(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


def _update_json(path: Path, update: Any) -> None:
    if path.is_file():
        data = _read_config(path)
        update(data)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_built(out: Path, built: Tokenizer, added: Sequence[tuple[int, AddedToken]]) -> None:
    """Save ``built`` as tokenizer.json; list ``added`` in the copied configs that list them."""
    built.save(str(out / "tokenizer.json"))

    def decoder(cfg: dict[str, Any]) -> None:
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for token_id, token in added:
                cfg["added_tokens_decoder"][str(token_id)] = _added_entry(token)

    def legacy(data: dict[str, Any]) -> None:
        data.update({token.content: token_id for token_id, token in added})

    _update_json(out / "tokenizer_config.json", decoder)
    _update_json(out / "added_tokens.json", legacy)


def write_tokenizer(
    donor: Path,
    out: Path,
    chat_template: str | None,
    built: Tokenizer | None = None,
    added: Sequence[tuple[int, AddedToken]] = (),
) -> list[str]:
    """Copy the donor's tokenizer files into ``out``; returns the names written.

    ``built``: the output tokenizer when it differs from the donor's (tokens ``added``, as
    ``(id, token)``): it replaces ``tokenizer.json`` and the configs learn the new tokens.
    """
    copied = []
    for name in TOKENIZER_FILES:
        src = donor / name
        if src.is_file() and not (built is not None and name == "tokenizer.json"):
            shutil.copyfile(inside(src, donor), out / name)
            copied.append(name)
    if built is not None:
        _write_built(out, built, added)
        copied.append("tokenizer.json")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")

        def set_template(cfg: dict[str, Any]) -> None:
            cfg["chat_template"] = chat_template

        _update_json(out / "tokenizer_config.json", set_template)
    return copied
