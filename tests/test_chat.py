"""The chat loop: history, adapter switching and a turn the model cannot answer, with a scripted answerer."""

from __future__ import annotations

from lorakit.chat import chat_loop


def run(lines, answer, adapters=("a", "b"), system=None):
    script = iter(lines)

    def read(prompt):
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    chat_loop(answer, list(adapters), "tiny", system, read=read)


def test_turns_carry_the_history_and_the_chosen_adapter(capsys):
    calls = []

    def answer(messages, adapter):
        calls.append(([m["content"] for m in messages], adapter))
        return f"reply {len(calls)}"

    run(["hi", "/adapter b", "again", "/base", "plain", "/adapter nope", "/reset", "fresh", "/quit", "unread"],
        answer, system="be brief")
    assert calls == [(["be brief", "hi"], "a"),
                     (["be brief", "hi", "reply 1", "again"], "b"),
                     (["be brief", "hi", "reply 1", "again", "reply 2", "plain"], None),
                     (["be brief", "fresh"], None)]
    out = capsys.readouterr().out
    assert "[a] assistant> reply 1" in out and "[b] assistant> reply 2" in out and "[base] assistant> reply 3" in out
    assert "no adapter 'nope'; loaded: a, b" in out and "history cleared" in out


def test_a_turn_that_cannot_be_answered_is_dropped_and_the_chat_goes_on(capsys):
    calls = []

    def answer(messages, adapter):
        calls.append([m["content"] for m in messages])
        if "long" in messages[-1]["content"]:
            raise ValueError("the conversation has 9000 tokens; tiny reads at most 8191: /reset to start over")
        return "ok"

    run(["first", "a long one", "second"], answer, adapters=())
    assert calls == [["first"], ["first", "ok", "a long one"], ["first", "ok", "second"]]
    out = capsys.readouterr().out
    assert "lorakit chat: the conversation has 9000 tokens" in out and out.count("[base] assistant> ok") == 2
