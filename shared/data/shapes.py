"""Which columns mean what: the known layouts, the user's mapping, and rows → turns.

A *layout* says how one input's columns (CSV header, JSON keys, Parquet columns) map onto
roles. Three kinds:

  - ``qa``: a Q&A table, roles title, question, reply, is_best (lawzhidao's own header);
  - ``prompt``: a prompt/response table, roles prompt, query, response, system, history
    (Alpaca's ``instruction, input, output, system, history``; also ``prompt, response``
    and ``query, response``);
  - ``chat``: one conversation per object (ChatGLM3/ShareGPT ``conversations``, OpenAI
    ``messages``); JSON only.

``preprocess.columns`` in the config (as LLaMA-Factory's dataset_info ``columns``) maps roles
to the user's own names; an input whose names fit neither that mapping nor a known layout
is refused with the names found and a mapping that would fit (``DataError``, exit 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

from shared.core.config import QA_ROLES, ColumnsConfig
from shared.core.errors import DataError
from shared.data.conversation import SchemaError

# Known layouts, tried in order: (name, kind, role -> name in the data, required roles).
DEFAULT_LAYOUTS: tuple[tuple[str, str, dict[str, str], tuple[str, ...]], ...] = (
    ("lawzhidao", "qa", {"title": "title", "question": "question", "reply": "reply", "is_best": "is_best"}, ("title", "reply")),
    ("alpaca", "prompt", {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                          "history": "history"}, ("prompt", "response")),
    ("prompt/response", "prompt", {"prompt": "prompt", "query": "query", "response": "response", "system": "system",
                                   "history": "history"}, ("prompt", "response")),
    ("query/response", "prompt", {"prompt": "query", "response": "response", "system": "system",
                                  "history": "history"}, ("prompt", "response")),
)
CHAT_KEYS = ("messages", "conversations")
EXPECTED = ("title,reply[,question,is_best] (lawzhidao), instruction,output[,input,system,history] (Alpaca), "
            "prompt,response[,system]")
# Names people give each role's column, for the mapping the error message suggests (compared
# case-free, without spaces, '_' or '-'). A flag-like or detail-like column makes it a Q&A table.
_TITLE = ("title", "subject", "headline", "标题", "题目", "问题标题", "主题")
_ASK = ("question", "questions", "q", "prompt", "instruction", "query", "ask", "问题", "问", "提问", "咨询", "咨询内容",
        "指令", "用户", "用户问题", "问题内容")
_DETAIL = ("detail", "details", "description", "desc", "body", "questiondetail", "questionbody", "补充说明", "补充", "问题描述",
           "问题详情", "问题补充", "详情", "详细描述", "描述", "说明", "背景")
_INPUT = ("input", "context", "输入", "上下文")
_ANSWER = ("answer", "answers", "a", "response", "output", "reply", "replytext", "completion", "target", "bestanswer", "回答",
           "答案", "答", "回复", "解答", "输出", "律师回答", "助手")
_FLAG = ("isbest", "best", "isaccepted", "accepted", "isbestanswer", "是否最佳", "最佳", "是否采纳", "采纳", "已采纳")
_SYSTEM = ("system", "systemprompt", "系统", "系统提示")
_HISTORY = ("history", "历史", "对话历史")


@dataclass(frozen=True)
class Layout:
    """How one input's names map onto roles (picklable: worker processes get it)."""

    kind: str  # "qa" | "prompt" | "chat"
    fields: tuple[tuple[str, str], ...] = ()  # (role, name as it appears in the data)
    origin: str = ""  # "lawzhidao", "alpaca", "preprocess.columns"...
    unused: tuple[str, ...] = ()  # names in the data that no role reads: their values are not used

    def get(self, role: str) -> str | None:
        return dict(self.fields).get(role)

    def describe(self) -> str:
        if self.kind == "chat":
            return "chat (conversations/messages)"
        return f"{self.origin}: " + ", ".join(f"{role}={name}" for role, name in self.fields)


CHAT = Layout("chat", (), "chat")


def _kind(mapping: dict[str, str]) -> str:
    return "qa" if any(r in QA_ROLES for r in mapping) else "prompt"


def match(names: Iterable[str], columns: ColumnsConfig | None, *, where: str, what: str = "header",
          chat: bool = False) -> Layout:
    """The layout of an input whose column/key names are ``names`` (compared case-free).

    ``columns`` (the config's mapping) wins when every name it maps is present; else the
    first known layout whose required names are present; else ``DataError`` naming the names
    found and the mapping that would fit. ``chat``: JSON objects may also be conversations.
    """
    found = [str(n).strip().lstrip("\ufeff") for n in names]
    folded = {n.lower(): n for n in found}
    if columns is not None:
        mapping = columns.mapping()
        if all(name.lower() in folded for name in mapping.values()):
            fields = tuple((r, folded[n.lower()]) for r, n in mapping.items())
            return Layout(_kind(mapping), fields, "preprocess.columns", _unused(found, fields))
    if chat and any(k in folded for k in CHAT_KEYS):
        used = next(k for k in CHAT_KEYS if k in folded)  # chat_turns reads messages before conversations
        return replace(CHAT, unused=tuple(n for n in found if n.lower() != used))
    for name, kind, roles, required in DEFAULT_LAYOUTS:
        if all(roles[r] in folded for r in required):
            # JSON objects may carry optional keys (system, history) the first one lacked; a CSV has its header.
            fields = tuple((r, folded.get(n, n)) for r, n in roles.items() if n in folded or chat)
            return Layout(kind, fields, name, _unused(found, fields))
    shown = ", ".join(found)[:200] or "none"
    mapped = ""
    if columns is not None:
        absent = [n for n in columns.mapping().values() if n.lower() not in folded]
        mapped = f"preprocess.columns names {', '.join(absent)}, not in the {what}; "
    expected = EXPECTED + (", or a conversations/messages list" if chat else "")
    roles = suggested_roles(found)
    left = [n for n in found if n not in roles.values()]
    unused = f" ({_and(left)} {'fits' if len(left) == 1 else 'fit'} no role and would stay unused)" if left else ""
    raise DataError(f"{where}: unknown {what} ({shown}); {mapped}expected {expected}; "
                    f"map your names in the config{unused}: {suggest(found)}")


def _unused(found: list[str], fields: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    used = {name.lower() for _, name in fields}
    return tuple(n for n in found if n.lower() not in used)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def suggested_roles(found: list[str]) -> dict[str, str]:
    """Role -> name for every one of ``found`` that fits a role: the Q&A-table roles (title,
    question, reply, is_best) when a flag-like or detail-like column is there, or a title beside
    a question, else the prompt/response roles (prompt, query, response, system, history).
    Without a recognisable question or answer, the first columns left stand in for them."""
    taken: set[str] = set()

    def pick(*candidates: tuple[str, ...]) -> str | None:
        for names in candidates:
            for want in names:
                for name in found:
                    if _fold(name) == want and name not in taken:
                        taken.add(name)
                        return name
        return None

    def first_left() -> str | None:
        name = next((n for n in found if n not in taken), None)
        if name is not None:
            taken.add(name)
        return name

    folded = {_fold(n) for n in found}
    qa = bool(folded & set(_FLAG + _DETAIL)) or bool(folded & set(_TITLE) and folded & set(_ASK))
    roles: dict[str, str | None]
    if qa:
        title = pick(_TITLE, _ASK)
        reply = pick(_ANSWER)
        roles = {"title": title, "question": pick(_DETAIL, _ASK), "reply": reply, "is_best": pick(_FLAG)}
        roles["title"] = title or first_left() or "<question column>"
        roles["reply"] = reply or first_left() or "<answer column>"
    else:
        prompt = pick(_ASK, _TITLE)
        response = pick(_ANSWER)
        roles = {"prompt": prompt, "query": pick(_INPUT), "response": response, "system": pick(_SYSTEM),
                 "history": pick(_HISTORY)}
        roles["prompt"] = prompt or first_left() or "<question column>"
        roles["response"] = response or first_left() or "<answer column>"
    return {r: n for r, n in roles.items() if n is not None}


def suggest(found: list[str]) -> str:
    """A ``preprocess.columns`` mapping that fits these names (``suggested_roles``), as one line of YAML."""
    inner = ", ".join(f"{r}: {json.dumps(n, ensure_ascii=False)}" for r, n in suggested_roles(found).items())
    return "preprocess: {columns: {" + inner + "}}"


def text_of(value: Any, role: str, name: str) -> str:
    """A cell as text: strings as they are, numbers and flags spelled out, missing as empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return str(value)
    raise SchemaError(f"{role} ({name!r}) holds a {type(value).__name__}; expected text")


def prompt_turns(values: dict[str, Any], layout: Layout) -> list[dict[str, str]]:
    """The turns of one prompt/response row (roles → values as read; not yet cleaned).

    As LLaMA-Factory's Alpaca converter: system first, then each ``history`` pair as a user
    and an assistant turn, then the prompt (and the query on a new line) and the response.
    """
    def get(role: str) -> Any:
        name = layout.get(role)
        return values.get(name) if name is not None else None

    for role in ("prompt", "response"):
        if layout.get(role) not in values:
            raise SchemaError(f"no {layout.get(role)!r} (the {role})")
    turns = []
    system = text_of(get("system"), "system", layout.get("system") or "")
    if system.strip():
        turns.append({"role": "system", "content": system})
    for pair in _history(get("history"), layout.get("history") or "history"):
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = text_of(get("prompt"), "prompt", layout.get("prompt") or "")
    query = text_of(get("query"), "query", layout.get("query") or "")
    user = "\n".join(p for p in (prompt, query) if p.strip())
    turns += [{"role": "user", "content": user},
              {"role": "assistant", "content": text_of(get("response"), "response", layout.get("response") or "")}]
    return turns


def _history(value: Any, name: str) -> list[tuple[str, str]]:
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):  # a CSV cell holds it as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise SchemaError(f"history ({name!r}) is not JSON; expected a list of [question, answer] pairs") from None
    if not isinstance(value, list):
        raise SchemaError(f"history ({name!r}) is a {type(value).__name__}; expected a list of [question, answer] pairs")
    pairs = []
    for index, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise SchemaError(f"history item {index} is not a [question, answer] pair of texts")
        pairs.append((pair[0], pair[1]))
    return pairs
