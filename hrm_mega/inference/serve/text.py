"""Text around the engine: incremental detokenization with stop strings, and chat prompts.

`TextStream` turns a sequence's new tokens into text deltas as they arrive. Decoding one token at a time
garbles SentencePiece text (a piece carries its leading space, which a decoder drops at the start of
a sequence, and a byte-fallback character spans several tokens), so each delta is the difference
between decoding a short window of tokens with and without the newest ones (the window starts a few
prompt tokens back), and a delta ending in an incomplete character waits for the next token. Stop
strings end the text before their first occurrence; text that might be the start of one is held back
until it is clear that it is not.

Chat prompts: `gemma_chat_prompt` renders messages in Gemma's turn format

    <start_of_turn>user\\n{system}\\n\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n ...
    <start_of_turn>model\\n

(the system message, if any, opens the first user turn, as Gemma 3's own template does); the BOS token
is not part of the text (the caller prepends its id). `jinja_chat_prompt` renders a Hugging Face style
Jinja template in a sandbox instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

CONTEXT_TOKENS = 4  # prompt tokens decoded before the first new one, so its leading space survives
REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
GEMMA_STOP = "<end_of_turn>"


class TextStream:
    """Text deltas of a sequence's new tokens (module docstring). push() each token; finish() once."""

    def __init__(
        self, decode: Callable[[list[int]], str], prompt: Sequence[int], stop: Sequence[str]
    ) -> None:
        self.decode = decode
        self.ids = list(prompt[len(prompt) - min(len(prompt), CONTEXT_TOKENS) :])
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] decoded already; ids[read:] not yet
        self.stop = [s for s in stop if s]
        self.text = ""  # the new text so far (up to a stop string)
        self.sent = 0  # characters of it handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds a token; returns the text now safe to hand out (possibly ""). Check `stopped` after."""
        self.ids.append(token)
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence is over: returns what was held back (an incomplete character decodes as U+FFFD)."""
        if not self.stopped:
            self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> None:
        if self.read == len(self.ids):
            return
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return  # no complete character yet
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:  # an earlier match of any stop string wins
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):  # hold back a tail that may begin a stop string
            end -= max(
                (k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0
            )
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta


class ChatError(ValueError):
    """Messages that do not make a chat prompt; the message is one line."""


def gemma_chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """(role, content) pairs -> Gemma's turn format, ending with the opening of the model's turn.

    Roles: an optional first `system` (or `developer`) message, then `user` and `assistant` turns that
    alternate, starting with a user turn. Contents are stripped of surrounding whitespace, as Gemma 3's
    template does."""
    system = ""
    if messages and messages[0][0] in ("system", "developer"):
        system = messages[0][1].strip() + "\n\n"
        messages = messages[1:]
    if not messages:
        raise ChatError("messages holds no user message")
    parts = []
    for i, (role, content) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatError(
                f"messages[{i}] has role {role!r}: after an optional system message, roles must alternate "
                "user/assistant/user/..."
            )
        turn = "model" if role == "assistant" else "user"
        parts.append(f"<start_of_turn>{turn}\n{system if i == 0 else ''}{content.strip()}<end_of_turn>\n")
    if messages[-1][0] != "user":
        raise ChatError("the last message must be a user message (the model answers it)")
    return "".join(parts) + "<start_of_turn>model\n"


def jinja_chat_prompt(path: str | Path) -> Callable[[Sequence[tuple[str, str]]], str]:
    """A Hugging Face style chat template (Jinja, read from `path`) as a renderer of (role, content)
    pairs. It is rendered in Jinja's immutable sandbox with `messages`, `add_generation_prompt=True`
    and an empty `bos_token` (the caller prepends the BOS id); `raise_exception(msg)` fails the request."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        source = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--chat-template {path}: {e.strerror or e}") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ChatError(f"the chat template refused the messages: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"--chat-template {path}: not a Jinja template ({str(e).splitlines()[0]})") from None

    def render(messages: Sequence[tuple[str, str]]) -> str:
        try:
            return template.render(
                messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
                bos_token="", eos_token="",
            )  # fmt: skip
        except TemplateError as e:
            raise ChatError(f"the chat template failed: {str(e).splitlines()[0]}") from None

    return render
