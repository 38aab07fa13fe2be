"""What a merged export needs so that `vllm serve DIR` takes it as it is (`minicpmv-export --format merged --for-vllm`).

Only two keys are added; weights, tensor names and every other file stay those of the merged export, so the
folder still loads in our loaders and in the official code:
- config.json `version: 2.0`: vLLM tells MiniCPM-V versions apart by this key and, without it, calls a model
  2.0 only when hidden_size == 2304 and query_num == 64 (small checkpoints would be taken for 2.5);
- tokenizer_config.json `chat_template`: the official prompt (`<用户>`/`<AI>` turns, bos first). Without it vLLM
  falls back to a ChatML template, which 2.0 was never trained on.
Importing this module does not import vLLM (exports run in the training environment).
"""

from __future__ import annotations

import json
from pathlib import Path

VERSION = 2.0

# Content is a plain string on purpose: vLLM then renders image parts as "(<image>./</image>)" lines in front of
# the text; the template turns them into "<image></image>", which the plugin's processor expands into the official
# placeholder (followed by "\n" + text, as in the official prompt). bos comes from the template because vLLM
# tokenizes rendered chat prompts without adding special tokens. System messages follow the project's rule
# (model/conversation.py): they may only open the conversation, and their text goes in front of the next user
# turn's text, after its pictures. A picture sent without text still ends its line ("\n"), as the official prompt's.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='', started=false) -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] | replace('(<image>./</image>)', '<image></image>') -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.started -%}{{- raise_exception('a system message may only open the conversation') -}}{%- endif -%}"
    "{%- set ns.system = ns.system + content + '\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set lead = namespace(images='', rest=content) -%}"
    "{%- for _ in range(64) -%}{%- if lead.rest.startswith('<image></image>\n') -%}"
    "{%- set lead.images = lead.images + '<image></image>\n' -%}{%- set lead.rest = lead.rest[16:] -%}"
    "{%- elif lead.rest == '<image></image>' -%}"
    "{%- set lead.images = lead.images + '<image></image>\n' -%}{%- set lead.rest = '' -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- '<用户>' + lead.images + ns.system + lead.rest -}}{%- set ns.system = '' -%}{%- set ns.started = true -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<AI>' + content -}}{%- set ns.started = true -%}"
    "{%- else -%}{{- raise_exception('MiniCPM-V 2.0 knows system, user and assistant turns, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<AI>' -}}{%- endif -%}"
)


def _update_json(path: Path, **keys) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(keys)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prepare_for_vllm(folder: str | Path) -> Path:
    """Add `version` to config.json and the chat template to tokenizer_config.json of a merged export."""
    folder = Path(folder)
    for name in ("config.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {name}: prepare_for_vllm needs a merged MiniCPM-V 2.0 export")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if str(config.get("version", VERSION)) != str(VERSION):
        raise ValueError(f"{str(folder)!r} is MiniCPM-V {config['version']}, not 2.0")
    _update_json(folder / "config.json", version=VERSION)
    _update_json(folder / "tokenizer_config.json", chat_template=CHAT_TEMPLATE)
    return folder
