"""Sentiment and urgency of visitor messages, as conversation tags (sentiment:negative|positive, the
latest replacing the earlier; urgency:high); an urgent, unhappy visitor is handed to a person. Rules
only (Chinese and English), so it needs no model and adds no latency."""

import re

MANIFEST = {
    "name": "ai_enhancer",
    "version": "1.0.0",
    "description": "Tags sentiment and urgency; hands urgent, unhappy visitors to a person",
    "enabled_by_default": True,
    "hooks": ["on_message"],
}

_NEGATIVE = re.compile(r"生气|失望|太差|垃圾|骗|投诉|差评|恶心|烦死|气死|不满|糟糕|坑|无语|离谱|"
                       r"\b(angry|upset|disappointed|terrible|awful|worst|useless|scam|complain|complaint|"
                       r"unacceptable|ridiculous|furious|frustrat\w*)\b", re.I)
_POSITIVE = re.compile(r"谢谢|感谢|太好了|满意|好评|棒|赞|\b(thanks|thank you|great|perfect|awesome|love it|helpful)\b",
                       re.I)
_URGENT = re.compile(r"紧急|急用|马上|立刻|立即|尽快|赶紧|今天必须|十万火急|急急|\b(urgent|urgently|asap|immediately|"
                     r"right now|emergency|as soon as possible)\b|!!+|！！+", re.I)


async def on_message(ctx, text, reply_text="", slots=None):
    negative = bool(_NEGATIVE.search(text))
    positive = not negative and bool(_POSITIVE.search(text))
    urgent = bool(_URGENT.search(text))
    # A neutral message adds nothing: the tag says how the visitor last felt, not how every line reads.
    tags = ["sentiment:negative"] if negative else ["sentiment:positive"] if positive else []
    if urgent:
        tags.append("urgency:high")
    out = {"tags": tags}
    if negative and urgent:
        out["handoff"] = "urgent_negative"
        out["note"] = "urgent and unhappy" if ctx.lang != "zh" else "情绪不满且紧急"
    return out
