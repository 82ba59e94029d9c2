"""An interactive chat with the base model and its adapters, switching between them by name."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

HELP = "commands: /adapter NAME (switch), /base (no adapter), /adapters (list), /reset (forget history), /quit"


def chat_loop(model, tokenizer, adapters: Sequence[str], base: str, system_prompt: Optional[str] = None,
              read: Optional[Callable[[str], str]] = None, **sampling) -> None:
    """Read user turns until /quit or end of input; answer each with the chosen adapter (the first, at start).

    `read` asks for a line (default: input()); `sampling`: generate()'s max_new_tokens, temperature and top_p.
    """
    from lorakit.generation import generate

    read = read or input
    names = list(adapters)
    current: Optional[str] = names[0] if names else None
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print(f"lorakit chat on {base}; adapters: {', '.join(names) or 'none'}; {HELP}")
    while True:
        try:
            line = read(f"[{current or 'base'}] you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit", "/q"):
                return
            current = _command(model, names, current, history, command, arg.strip())
            continue
        history.append({"role": "user", "content": text})
        with model.disable_adapter() if (current is None and names) else contextlib.nullcontext():
            reply = generate(model, tokenizer, [system + history], **sampling)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"[{current or 'base'}] assistant> {reply}")


def _command(model, names: list[str], current: Optional[str], history: list, command: str,
             arg: str) -> Optional[str]:
    """Run one /command; returns the adapter in use after it (None: the base model)."""
    if command == "/base":
        print("using the base model")
        return None
    if command == "/adapter":
        if arg not in names:
            print(f"no adapter {arg!r}; loaded: {', '.join(names) or 'none'} (load more with --adapter NAME=DIR)")
            return current
        model.set_adapter(arg)
        print(f"using adapter {arg}")
        return arg
    if command == "/adapters":
        print(", ".join(names) or "none loaded")
    elif command == "/reset":
        history.clear()
        print("history cleared")
    else:
        print(HELP)
    return current
