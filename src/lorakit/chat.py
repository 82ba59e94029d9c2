"""An interactive chat with the base model and its adapters, switching between them by name."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

HELP = "commands: /adapter NAME (switch), /base (no adapter), /adapters (list), /reset (forget history), /quit"

Answer = Callable[[list[dict], Optional[str]], str]  # (messages, adapter or None for the base) -> the reply


def chat_loop(answer: Answer, adapters: Sequence[str], base: str, system_prompt: Optional[str] = None,
              read: Optional[Callable[[str], str]] = None) -> None:
    """Read user turns until /quit or end of input; answer each with the chosen adapter (the first, at start).

    `answer(messages, adapter)` gives the reply to the conversation so far (ValueError: it cannot, say why; the
    turn is dropped); `read` asks for a line (default: input()).
    """
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
            current = _command(names, current, history, command, arg.strip())
            continue
        try:
            reply = answer(system + history + [{"role": "user", "content": text}], current)
        except ValueError as exc:
            print(f"lorakit chat: {exc}")
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        print(f"[{current or 'base'}] assistant> {reply}")


def _command(names: list[str], current: Optional[str], history: list, command: str, arg: str) -> Optional[str]:
    """Run one /command; returns the adapter in use after it (None: the base model)."""
    if command == "/base":
        print("using the base model")
        return None
    if command == "/adapter":
        if arg not in names:
            print(f"no adapter {arg!r}; loaded: {', '.join(names) or 'none'} (load more with --adapter NAME=DIR)")
            return current
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
