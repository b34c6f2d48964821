"""Prompt weighting: the syntax users type, read into (text, weight) fragments by compel's parser.

Two syntaxes, one meaning. A1111's, which most users type: `(word:1.3)` weighs by 1.3, `(word)` by 1.1,
`[word]` by 1/1.1, nested groups multiply; it is rewritten into compel's before compel parses it. Compel's
own: `(words)1.3`, `word+` / `word++` (1.1 per +), `word-` (0.9 per -), `(words)+`. A literal parenthesis or
bracket is escaped: `\\(`. A prompt without any of it is never parsed: its text goes to the tokenizer as typed.
What a weight does to the embeddings is compel's too (voltacache.pipeline.weighting).

Torch-free until a prompt uses the syntax: compel's parser comes with compel, which imports torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import InvalidRequest

# Anything that may be weighting: a parenthesis, a bracket or an escape, or a word ending in + or - (compel's
# word+, word--) before a space, punctuation or the end. "well-lit" and "5-4" are not.
SYNTAX = re.compile(r"[()\[\]\\]|\w[+-]+(?=[\s,.;:!?]|$)")
A1111_WEIGHT = 1.1  # what one (word) multiplies by, and [word] divides by
NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
WEIGHT_AT_END = re.compile(rf":\s*({NUMBER})\s*$")  # (word:1.3)
MALFORMED_WEIGHT = re.compile(r":\s*([+-]?[\d.][^\s:]*)\s*$")  # (word:1.3.4), (word:1,3)
COMPEL_WEIGHT = re.compile(rf"{NUMBER}|[+-]+")  # what compel reads right after a group's ")"
MAX_WEIGHT = 100.0
OPENING = {")": "(", "]": "["}
COMPEL_OPERATOR = re.compile(r"\.(and|blend|swap)\(")  # compel's operators on prompts, which voltacache does not serve
UNSUPPORTED = {  # is it .swap()
    False: "compel's .and(), .blend() and conjunctions are not supported; use weights",
    True: "compel's .swap() (cross-attention control) is not supported; use weights",
}


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt as the text encoder reads it: `text`, its fragments' texts joined (the prompt as typed when it
    uses no syntax), and the (text, weight) fragments compel weighs when one weight is not 1."""

    text: str
    fragments: tuple[tuple[str, float], ...] = ()
    compel: str = ""  # the prompt in compel's syntax, which compel pools (SDXL's pooled embedding) as it stands

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for _, weight in self.fragments)


def check_weighting(prompt: str, name: str = "prompt") -> None:
    """Refuse malformed weighting syntax in one line, without compel (which imports torch): what a request's
    check finds before anything heavy loads. `parse` finds the rest (compel's own refusals)."""
    if SYNTAX.search(prompt):
        to_compel(prompt, name)


@functools.lru_cache(maxsize=1024)
def parse(prompt: str, name: str = "prompt") -> WeightedPrompt:
    """The prompt's text and fragments; a malformed weight is refused naming `name` (the request's field)."""
    if not SYNTAX.search(prompt):
        return WeightedPrompt(prompt)
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt, Fragment

    rewritten = to_compel(prompt, name)
    conjunction = Compel.parse_prompt_string(rewritten)
    parts = conjunction.prompts[0].children if len(conjunction.prompts) == 1 else ()
    single = len(conjunction.prompts) == 1 and conjunction.weights == [1.0]
    if not single or type(conjunction.prompts[0]) is not FlattenedPrompt:
        raise InvalidRequest(f"{name}: {UNSUPPORTED[False]}")
    if not all(type(part) is Fragment for part in parts):
        raise InvalidRequest(f"{name}: {UNSUPPORTED[True]}")
    fragments = tuple((part.text, float(part.weight)) for part in parts if part.text)
    for text, weight in fragments:
        if not 0 <= weight <= MAX_WEIGHT:
            raise InvalidRequest(f"{name}: {text!r} weighs {weight:g}; use a weight from 0 to {MAX_WEIGHT:g}")
    return WeightedPrompt(" ".join(text for text, _ in fragments), fragments, rewritten)


def to_compel(prompt: str, name: str = "prompt") -> str:
    """A1111's syntax rewritten into compel's (compel's own passes through): `(a:1.3)` -> `(a)1.3`, `(a)` ->
    `(a)1.1`, `[a]` -> `(a)0.909..`; `\\[` and `\\]` become plain brackets (compel reads no brackets)."""
    operator = COMPEL_OPERATOR.search(prompt)
    if operator:
        raise InvalidRequest(f"{name}: {UNSUPPORTED[operator.group(1) == 'swap']}")
    out, stack, i = [], [], 0  # stack: (opening character, its position in `out`, its position in the prompt)
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and i + 1 < len(prompt) and prompt[i + 1] in "()[]":
            out.append(prompt[i : i + 2] if prompt[i + 1] in "()" else prompt[i + 1])
            i += 2
            continue
        if char in "([":
            stack.append((char, len(out), i))
            out.append("(")
        elif char in ")]":
            if not stack or stack[-1][0] != OPENING[char]:
                raise InvalidRequest(
                    f"{name}: unmatched {char!r} at character {i + 1}; escape a literal one as \\{char}"
                )
            opening, start, _ = stack.pop()
            inside = "".join(out[start + 1 :])
            del out[start + 1 :]
            out.append(_group(opening, inside, prompt[i + 1 :], name))
        else:
            out.append(char)
        i += 1
    if stack:
        opening, _, where = stack[-1]
        raise InvalidRequest(
            f"{name}: unmatched {opening!r} at character {where + 1}; close it, or escape a literal one as \\{opening}"
        )
    return "".join(out)


def _group(opening: str, inside: str, after: str, name: str) -> str:
    """One group's rewrite: its text and its weight after the ")" (the "(" is already written)."""
    if opening == "[":
        return f"{inside}){1 / A1111_WEIGHT:.7f}"
    weight = WEIGHT_AT_END.search(inside)
    if weight:
        value = float(weight.group(1))
        if not 0 <= value <= MAX_WEIGHT:
            raise InvalidRequest(f"{name}: ({inside}): use a weight from 0 to {MAX_WEIGHT:g}")
        return f"{inside[: weight.start()]}){value:g}"
    if MALFORMED_WEIGHT.search(inside):
        raise InvalidRequest(f"{name}: ({inside}): a weight is a number, e.g. (red:1.3)")
    if COMPEL_WEIGHT.match(after):  # compel's (words)1.3 or (words)+: its own weight follows
        return f"{inside})"
    return f"{inside}){A1111_WEIGHT}"
