"""Prompt files: JSONL, one `{"prompt": str}` (raw text) or `{"turns": [str, ...]}` (the first
turn, rendered with the target's chat template) per line, the format of ../shared/workloads/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tide.errors import TideError

BUILTIN_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
HOLDOUT_EVERY = 10  # the warm start holds out every 10th prompt (all its answers) for evaluation


class PromptFileError(TideError, ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool  # True: render as a user turn with the chat template


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    path = Path(path) if str(path) != "builtin" else BUILTIN_PROMPTS
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            prompts.append(_parse(item, f"{path}:{n}"))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts[:limit] if limit else prompts


def _parse(item, where: str) -> Prompt:
    if isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"]:
        return Prompt(item["prompt"], chat=False)
    turns = item.get("turns") if isinstance(item, dict) else None
    if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0]:
        return Prompt(turns[0], chat=True)
    raise PromptFileError(f'{where}: expected {{"prompt": str}} or {{"turns": [str, ...]}}')


def encode(tokenizer, prompt: Prompt) -> list[int]:
    if not prompt.chat:
        return tokenizer(prompt.text)["input_ids"]
    return chat_ids(tokenizer, [{"role": "user", "content": prompt.text}])


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's ids up to where a user's words start (system turn included)."""
    marker = "\u2063TIDE\u2063"  # text no template writes itself
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise PromptFileError("the model's chat template does not render a user turn")
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]
