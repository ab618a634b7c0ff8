"""The pure part of plugin tool use: which tool a visitor message asks for, with which arguments, and
whether a message confirms or declines the call the bot proposed.

Routing is by the plugins' own keywords and examples, never by the model, and a side-effecting call
needs a yes in a turn of its own: a message that asks for a refund and says "yes, confirmed" in the
same breath is a request, and the yes is asked for afterwards.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field

from kefu.shared.text import has_cjk


@dataclass(frozen=True)
class ToolSpec:
    plugin: str
    tool: str
    side_effecting: bool
    confirmation: str
    keywords: tuple[str, ...]
    examples: tuple[str, ...]
    # argument -> slot that fills it
    slot_arguments: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    ask_zh: str = ""
    ask_en: str = ""
    confirm_zh: str = ""
    confirm_en: str = ""

    @property
    def name(self) -> str:
        return f"{self.plugin}.{self.tool}"


@dataclass(frozen=True)
class Match:
    spec: ToolSpec
    arguments: dict[str, str]
    missing: tuple[str, ...]

    @property
    def arguments_json(self) -> str:
        """The arguments as the confirmation names them: one canonical text."""
        return json.dumps(self.arguments, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _keyword_hit(keyword: str, text: str) -> bool:
    k = _norm(keyword)
    if not k:
        return False
    if has_cjk(k):
        return k in text
    return re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", text) is not None


def match_tool(text: str, specs: list[ToolSpec], slots: dict[str, str]) -> Match | None:
    """The tool ``text`` asks for (the longest keyword wins, then the first plugin), with its arguments
    filled from ``slots`` (the message's own slots already merged in); None when no intent matches."""
    norm = _norm(text)
    best: tuple[int, int] | None = None
    chosen: ToolSpec | None = None
    for order, spec in enumerate(specs):
        hits = [len(k) for k in spec.keywords if _keyword_hit(k, norm)]
        hits += [len(e) for e in spec.examples if _norm(e) == norm]
        if hits and (best is None or (max(hits), -order) > best):
            best, chosen = (max(hits), -order), spec
    if chosen is None:
        return None
    args = {arg: slots[slot] for arg, slot in chosen.slot_arguments.items() if slots.get(slot)}
    missing = tuple(a for a in chosen.required if a not in args)
    return Match(chosen, args, missing)


_YES_ZH = re.compile(r"^(确认|确定|是的?|对的?|好的?|可以|行|没问题|同意|确认退款|确认申请|嗯+|好的?确认|确认无误)[。！!.，,\s]*$")
_NO_ZH = re.compile(r"^(取消|不用了?|不要了?|算了|不需要|不了|否|先不用?|不退了?)[。！!.，,\s]*$")
_YES_EN = re.compile(r"^(yes|yeah|yep|y|ok|okay|sure|confirm(ed)?|go ahead|please do|do it|yes,? please|"
                     r"yes,? go ahead|that'?s right|correct)[.!\s]*$", re.I)
_NO_EN = re.compile(r"^(no|nope|n|cancel|don'?t|do not|stop|never ?mind|no,? thanks?|not now)[.!\s]*$", re.I)


def confirmation_answer(text: str) -> bool | None:
    """True for a plain yes, False for a plain no, None for anything else (which is not an answer).

    Only a short, unambiguous reply counts: "yes, and refund order 123 too" is a new request, not a yes.
    """
    t = text.strip()
    if len(t) > 24:
        return None
    if _YES_ZH.match(t) or _YES_EN.match(t):
        return True
    if _NO_ZH.match(t) or _NO_EN.match(t):
        return False
    return None


def render(template: str, arguments: dict[str, str]) -> str:
    """``template`` with ``{argument}`` placeholders filled; unknown ones stay as written."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    values = {name: arguments.get(name, "{" + name + "}") for name in fields}
    try:
        return template.format(**values)
    except (ValueError, IndexError, KeyError):
        return template


def confirm_text(spec: ToolSpec, arguments: dict[str, str], lang: str) -> str:
    template = spec.confirm_zh if lang == "zh" else spec.confirm_en
    if template:
        return render(template, arguments)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(arguments.items()))
    return (f"确认执行 {spec.name}（{shown}）吗？请回复“确认”或“取消”。" if lang == "zh"
            else f"Shall I run {spec.name} ({shown})? Reply \"yes\" or \"no\".")


def ask_text(spec: ToolSpec, missing: tuple[str, ...], lang: str) -> str:
    if lang == "zh":
        return spec.ask_zh or f"请提供：{'、'.join(missing)}。"
    return spec.ask_en or f"Please tell me: {', '.join(missing)}."


CANCELLED_TEXT = {"zh": "好的，已取消，没有执行任何操作。", "en": "OK, cancelled. Nothing was done."}
FAILED_TEXT = {"zh": "抱歉，暂时无法完成这个操作，请稍后再试，或输入“转人工”联系人工客服。",
               "en": "Sorry, I couldn't do that right now. Please try again later, or type \"human\" for an agent."}
