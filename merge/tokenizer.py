"""The output tokenizer: copied from its donor, with an optional chat template.

The donor is ``tokenizer_source`` (``base``: the base model, else the first model; or a model
reference). ``chat_template`` is a named template (``chatml``, ``llama3``, ``alpaca``,
``mistral``), ``auto`` (the template most of the input models use) or a literal Jinja template;
it is written both to ``tokenizer_config.json`` and ``chat_template.jinja``.

What it does not do yet: vocabulary union and embedding permutation (tokenizer merging).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
)

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
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
        "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def read_chat_template(directory: Path) -> str | None:
    """A model's chat template (chat_template.jinja, else tokenizer_config.json)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, OSError):
            return None
        return value if isinstance(value, str) else None
    return None


def resolve_template(spec: str | None, model_dirs: Iterable[Path]) -> str | None:
    """The Jinja text for a recipe's chat_template value (None: keep the donor's)."""
    if spec is None:
        return None
    if spec == "auto":
        found = Counter(t for d in model_dirs if (t := read_chat_template(d)))
        return found.most_common(1)[0][0] if found else None
    return TEMPLATES.get(spec, spec)


def write_tokenizer(donor: Path, out: Path, chat_template: str | None) -> list[str]:
    """Copy the donor's tokenizer files into ``out``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        src = donor / name
        if src.is_file():
            shutil.copyfile(src, out / name)
            copied.append(name)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            cfg["chat_template"] = chat_template
            cfg_path.write_text(
                json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
    return copied
