from kefu.dialogue.memory import MAX_MEMORIES, MAX_SUMMARY_CHARS, fold, recall
from kefu.dialogue.policy import MAX_CONTEXT_CHARS, context_note
from kefu.dialogue.state import BotReply, Event, Provenance, Started, VisitorMessage
from kefu.dialogue.state import fold as fold_events


def conversation(exchanges: list[tuple[str, str, tuple[str, ...]]]):
    bodies = [Started("v")]
    for question, answer, citations in exchanges:
        bodies.append(VisitorMessage(question))
        bodies.append(BotReply(answer, "kb", citations, len(bodies) - 1, Provenance(evidence=answer)))
    events = [Event(f"e{i}", "c", "shop", i, i, "t", i + 1, b) for i, b in enumerate(bodies)]
    return fold_events("c", "shop", events)


PHONE = ("我想买个手机，X100 多少钱？", "X100 售价 3999 元。", ("phone-x100",))
KETTLE = ("K5 电水壶保修多久？", "K5 整机保修 18 个月。", ("kettle-k5",))
REFUND = ("退款多久到账？", "退款 1-3 个工作日到账。", ("refund-timeline",))
HOURS = ("深圳门店几点关门？", "每天 10:00–22:00。", ("store-shenzhen",))


def test_older_turns_fold_into_a_summary_and_at_most_three_memories():
    state = conversation([PHONE, KETTLE, REFUND, HOURS, ("谢谢", "不客气。", ()), ("再问一下", "好的。", ())])
    ctx = fold(state)
    assert [ex.question for ex in ctx.recent] == ["谢谢", "再问一下"]  # the last two verbatim
    assert len(ctx.memories) == MAX_MEMORIES
    assert [m.label for m in ctx.memories] == ["hours", "returns", "K5"]  # the most recent topics
    assert ctx.summary.startswith("Earlier: hours") and "K5 (warranty)" in ctx.summary
    assert fold(state, recent=0).summary.count(";") == MAX_MEMORIES - 1


def test_a_visitor_can_go_back_to_an_older_product():
    state = conversation([PHONE, KETTLE, REFUND, ("好的", "好的。", ()), ("嗯", "嗯。", ())])
    memory = recall(fold(state).memories, "之前那个手机保修多久？")
    assert memory is not None and memory.product == "X100"
    assert recall(fold(state).memories, "手机保修多久？") is None  # does not point back: the slot decides
    assert recall(fold(state).memories, "之前说的洗衣机呢？") is None  # nothing like it was asked


def test_the_note_stays_bounded_however_long_the_conversation():
    turns = [PHONE, KETTLE, REFUND, HOURS] * 200
    state = conversation(turns)
    ctx = fold(state)
    note = context_note([(ex.question, ex.answer) for ex in ctx.recent], {"product": "K5", "phone": "13800000000"},
                        ctx.summary)
    assert len(note) <= MAX_CONTEXT_CHARS and len(ctx.summary) <= MAX_SUMMARY_CHARS
    assert "13800000000" not in note  # the model never needs the phone number
    assert note.startswith("Earlier: ") and "Q: 深圳门店几点关门？ A: 每天 10:00–22:00。" in note
