"""Prompt formats and their tokenization: the one place where text becomes token ids.

Training, validation and labeling all go through `PromptFormatter`, so the model is scored on exactly the
prompt it was trained on. Two formats:

- `chat`: the tokenizer's own chat template (the default when it has one). The user turn is
  "{instruction}\\n{input}"; no system prompt unless configured (DeepSeek advises none).
- `plain`: FinGPT's "Instruction: ...\\nInput: ...\\nAnswer: " for base models without a template.

The answer is tokenized apart from the prompt and always ends with the EOS id, so labels can be -100 on the
prompt alone and the model learns to stop, even when pad == eos (DeepSeek's case).

`<think>` policy (DeepSeek-R1-Distill and other reasoning templates): since Feb 2025 their generation prompt
ends `<｜Assistant｜><think>\\n` and, untuned, the model writes a long trace before answering. We never want a
trace for a one-word label, so with `think="empty"` (what "auto" picks when the vocabulary has `</think>`) every
prompt, in training and labeling alike, ends with a closed, empty think block `<think>\\n\\n</think>\\n\\n` and the
answer follows it directly. `think="none"` removes the think tags from the prompt altogether. Training and
labeling share the policy because it is saved beside the adapter (prompt_format.json).

BOS exactly once: a rendered template already contains the BOS text, so it is encoded without special tokens
and BOS is added only if the model expects one and the text lacks it (DeepSeek-R1 issue #151).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional, Sequence

from .errors import ConfigError, ModelError

PromptStyle = Literal["auto", "chat", "plain"]
ThinkPolicy = Literal["auto", "empty", "none"]

DEFAULT_INSTRUCTION = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)
DEFAULT_LABELS = ("negative", "neutral", "positive")
EMPTY_THINK = "<think>\n\n</think>\n\n"


class PromptFormatter:
    """Formats (instruction, input) pairs into token ids for one tokenizer and one prompt style."""

    def __init__(
        self,
        tokenizer: Any,
        style: PromptStyle = "auto",
        think: ThinkPolicy = "auto",
        system_prompt: Optional[str] = None,
    ) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if style == "auto":
            style = "chat" if has_template else "plain"
        if style == "chat" and not has_template:
            raise ConfigError(
                "data.prompt_style=chat but the tokenizer has no chat template; use data.prompt_style=plain"
            )
        self.style = style
        vocab = tokenizer.get_vocab()
        if think == "auto":
            think = "empty" if (style == "chat" and "</think>" in vocab) else "none"
        self.think = think
        self.system_prompt = system_prompt
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has no EOS token; answers must end with one so the model learns to stop "
                             "(give it one: set eos_token in the model folder's tokenizer_config.json)")
        self.eos_id = int(tokenizer.eos_token_id)
        # Does this tokenizer add BOS by itself (and so does the model expect one)?
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = tokenizer.bos_token_id if (tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]) else None

    # -- text -------------------------------------------------------------------------------------------
    def render(self, instruction: str, input: str = "") -> str:
        """The prompt as text (everything before the answer)."""
        user = f"{instruction}\n{input}" if input else instruction
        if self.style == "plain":
            return f"Instruction: {instruction}\nInput: {input}\nAnswer: " if input else f"Instruction: {instruction}\nAnswer: "
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.think == "empty":
            if text.endswith("<think>\n"):
                text = text + EMPTY_THINK[len("<think>\n"):]
            elif not text.endswith(EMPTY_THINK):
                text = text + EMPTY_THINK
        elif self.think == "none" and text.endswith("<think>\n"):
            text = text[: -len("<think>\n")]
        return text

    # -- ids ----------------------------------------------------------------------------------------------
    def encode_prompt(self, instruction: str, input: str = "") -> list[int]:
        return self._with_bos(self.tokenizer(self.render(instruction, input), add_special_tokens=False)["input_ids"])

    def _with_bos(self, ids: list[int]) -> list[int]:
        """BOS exactly once: added only where the tokenizer expects it and the rendered template lacks it."""
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def encode_answer(self, answer: str) -> list[int]:
        """Answer tokens followed by EOS (EOS keeps its label: it is how the model learns to stop)."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def encode_example(
        self, instruction: str, input: str, output: str, max_length: int
    ) -> tuple[list[int], list[int], int, bool]:
        """Token ids and labels of one training row; returns (input_ids, labels, prompt_len, truncated).

        Over-long rows lose the end of their *input* text, never the instruction or the answer: cutting the
        answer would teach the model to stop early, cutting the template would teach a broken format.
        """
        answer = self.encode_answer(output)
        prompt = self.encode_prompt(instruction, input)
        truncated = False
        if len(prompt) + len(answer) > max_length and input:
            truncated = True
            text_ids = self.tokenizer(input, add_special_tokens=False)["input_ids"]
            keep = len(text_ids) - (len(prompt) + len(answer) - max_length)
            # Re-tokenizing decoded text can merge differently; shrink until it fits (rarely more than twice).
            while keep > 0:
                cut = self.tokenizer.decode(text_ids[:keep])
                prompt = self.encode_prompt(instruction, cut)
                if len(prompt) + len(answer) <= max_length:
                    break
                keep -= max(1, (len(prompt) + len(answer) - max_length))
            if keep <= 0:
                prompt = self.encode_prompt(instruction, "")
        if len(prompt) + len(answer) > max_length:
            raise ConfigError(
                f"instruction and answer alone need {len(prompt) + len(answer)} tokens, more than "
                f"data.max_length={max_length}; raise data.max_length"
            )
        return prompt + answer, [-100] * len(prompt) + answer, len(prompt), truncated

    def encode_prompts(self, rows: Sequence[tuple[str, str]], answer: str, max_length: int) -> list[list[int]]:
        """`encode_example(instruction, input, answer, max_length)`'s prompt ids for many rows at once: the
        rendered prompts go through the tokenizer in one batch (fast tokenizers encode a batch in parallel);
        only rows too long to fit take the per-row path that cuts their input."""
        n_answer = len(self.encode_answer(answer))
        texts = [self.render(instruction, input) for instruction, input in rows]
        out = []
        for (instruction, input), ids in zip(rows, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids = self._with_bos(ids)
            if len(ids) + n_answer > max_length:
                ids = self.encode_example(instruction, input, answer, max_length)[0][:-n_answer]
            out.append(ids)
        return out

    def encode_labels(self, labels: Sequence[str]) -> list[list[int]]:
        """Token ids of each label's full answer (label + EOS), as scored by label scoring."""
        seqs = [self.encode_answer(label) for label in labels]
        if len({tuple(s) for s in seqs}) != len(seqs):
            raise ConfigError(f"data.labels: {list(labels)} do not tokenize to distinct sequences; use labels that "
                              "differ as words")
        return seqs

    # -- identity -----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What is saved beside an adapter so labeling later formats prompts exactly as training did."""
        return {
            "style": self.style,
            "think": self.think,
            "system_prompt": self.system_prompt,
            "chat_template": getattr(self.tokenizer, "chat_template", None) if self.style == "chat" else None,
            "eos_token": self.tokenizer.eos_token,
            "bos_token": self.tokenizer.bos_token if self.bos_id is not None else None,
        }

    def fingerprint(self) -> str:
        """Changes whenever the token ids this formatter produces could change (keys the tokenization cache)."""
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(sorted(tok.get_vocab().items()))
        blob = json.dumps(self.describe(), sort_keys=True) + backend
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
