"""One identity for a question, whatever shape it came from (shared/data/conversation.py ``question_key``).

The same questions written in every input shape docs/data.md lists, read by the real readers and
the real pipeline (``build``): each shape alone gives every question the same id and split, and any
two shapes read together keep each question once. A Q&A-table row's question is its title plus
its detail, composed as the stage composes the user turn (``compose_user``); every other shape
carries that user turn as text (Alpaca may carry title and detail as ``instruction`` and ``input``
when the detail adds to the title: its user turn is then the same text).

``test_every_pair_of_shapes_*`` runs the whole table of ordered shape pairs on a fixed set of
questions chosen for the hard cases (empty detail, detail inside the title, title inside the
detail, punctuation and width variants); ``test_any_questions_*`` lets hypothesis draw the questions
and the pair.
"""

from __future__ import annotations

import csv
import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from shared.core.config import ColumnsConfig, PreprocessConfig
from shared.data.inputs import open_source
from shared.data.preprocessing import build, compose_user

# (title, detail): the Q&A table's two question columns.
Question = tuple[str, str]
QA_MAPPED = {"title": "问题", "question": "补充说明", "reply": "回答", "is_best": "是否最佳"}


def _user(q: Question) -> str:
    return compose_user(*q)


def _qa_csv(path: Path, rows: list[tuple[Question, str]]) -> tuple[Path, None]:
    with open(path.with_suffix(".csv"), "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["title", "question", "reply", "is_best"])
        writer.writerows([title, detail, answer, "1"] for (title, detail), answer in rows)
    return path.with_suffix(".csv"), None


def _qa_mapped_csv(path: Path, rows) -> tuple[Path, ColumnsConfig]:
    with open(path.with_suffix(".csv"), "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(QA_MAPPED.values()))
        writer.writerows([title, detail, answer, "是"] for (title, detail), answer in rows)
    return path.with_suffix(".csv"), ColumnsConfig(**QA_MAPPED)


def _jsonl(path: Path, objects: list[dict]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    return path


def _json_array(path: Path, objects: list[dict]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(objects, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _alpaca(q: Question) -> dict:
    """instruction = title and input = detail where that makes the same user turn, else the turn whole."""
    title, detail = q
    if detail and _user(q) == f"{title}\n{detail}":
        return {"instruction": title, "input": detail}
    return {"instruction": _user(q), "input": ""}


SHAPES = {
    "qa-csv": _qa_csv,
    "qa-mapped-csv": _qa_mapped_csv,
    "qa-jsonl": lambda p, rows: (_jsonl(p, [{"title": t, "question": d, "reply": a, "is_best": 1} for (t, d), a in rows]), None),
    "alpaca-json": lambda p, rows: (_json_array(p, [{**_alpaca(q), "output": a} for q, a in rows]), None),
    "prompt-response-csv": lambda p, rows: _prompt_csv(p, rows),
    "query-response-jsonl": lambda p, rows: (_jsonl(p, [{"query": _user(q), "response": a} for q, a in rows]), None),
    "chatglm3-jsonl": lambda p, rows: (_jsonl(p, [{"conversations": [{"role": "user", "content": _user(q)},
                                                                     {"role": "assistant", "content": a}]} for q, a in rows]), None),
    "openai-json": lambda p, rows: (_json_array(p, [{"messages": [{"role": "user", "content": [{"type": "text", "text": _user(q)}]},
                                                                  {"role": "assistant", "content": a}]} for q, a in rows]), None),
    "sharegpt-jsonl": lambda p, rows: (_jsonl(p, [{"conversations": [{"from": "human", "value": _user(q)},
                                                                     {"from": "gpt", "value": a}]} for q, a in rows]), None),
}


def _prompt_csv(path: Path, rows) -> tuple[Path, None]:
    with open(path.with_suffix(".csv"), "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "response"])
        writer.writerows([_user(q), a] for q, a in rows)
    return path.with_suffix(".csv"), None


# Wide dev and test bands, no top-up: a question's split is its hash alone, and most land outside train.
CONFIG = PreprocessConfig(dev_ratio=0.3, test_ratio=0.3, min_dev=0, min_test=0, min_answer_chars=1, min_question_chars=1)


def _answer(tag: str, index: int) -> str:
    return f"{tag}{index}号答复"


def _run(tmp: Path, shapes: list[str], questions: list[Question]) -> dict[int, list[tuple[str, str]]]:
    """Question index -> the (id, split) of every example kept for it (answers carry the index)."""
    tmp.mkdir(parents=True)
    sources = []
    for n, shape in enumerate(shapes):
        rows = [(q, _answer("甲乙丙丁"[n], i)) for i, q in enumerate(questions)]
        path, columns = SHAPES[shape](tmp / f"in{n}-{shape}", rows)
        sources.append(open_source(path, columns=columns))
    out = tmp / "out"
    out.mkdir()
    build(sources, out, tmp / "spill", CONFIG, [s.path.stat().st_size for s in sources], workers=1)
    kept: dict[int, list[tuple[str, str]]] = {}
    for split in ("train", "dev", "test"):
        for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            answer = record["conversations"][-1]["content"]
            index = int(answer[1:].removesuffix("号答复"))
            kept.setdefault(index, []).append((record["id"], split))
    return kept


def _check(tmp: Path, first: str, second: str, questions: list[Question]) -> None:
    alone = {shape: _run(tmp / f"alone-{shape}", [shape], questions) for shape in {first, second}}
    assert alone[first] == alone[second], f"{first} and {second} give the same questions other ids or splits"
    together = _run(tmp / "together", [first, second], questions)
    twice = {i: got for i, got in together.items() if len(got) != 1}
    assert not twice, f"{first} + {second}: kept more than once: {[(questions[i], got) for i, got in twice.items()]}"
    assert together == alone[first]  # once, with the id and split each shape gives alone


# The hard cases of "the same question" (title, detail), each with its own title.
QUESTIONS: list[Question] = [
    ("公司拖欠工资三个月了怎么办", ""),
    ("房东不退押金，说墙面弄脏了要扣钱，合理吗？", "住了两年，正常居住，墙上只有一点挂画留下的钉眼。"),
    ("工伤认定多久", "工伤认定"),  # the detail is inside the title: the title alone
    ("试用期", "试用期被辞退有补偿吗？入职两个月。"),  # the detail holds the title: the detail alone
    ("Is a verbal contract VALID?", "We agreed by phone."),
    ("ＡＢＣ公司 欠薪！", "全角字母和空格"),
    ("离婚后孩子抚养权归谁", "  孩子三岁，  \t我没有工作。 "),  # spacing the cleaning folds
    ("交通事故对方全责 不赔怎么办", "有交警认定书\n对方拖着不付"),  # a detail of two lines
]

PAIRS = [pytest.param(a, b, id=f"{a}+{b}") for a, b in itertools.permutations(SHAPES, 2)]


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_every_pair_of_shapes_keeps_each_question_once_in_one_split(tmp_path, first, second):
    _check(tmp_path, first, second, QUESTIONS)


_CHARS = st.sampled_from(list("劳动合同工资押金离婚赔偿责任法院起诉房东公司") + list("abcXYZ019") + list("，。？！,.?! 　ＡＢ１（）"))
_TEXT = st.text(_CHARS, min_size=0, max_size=12)


@st.composite
def _question(draw, index: int) -> Question:
    title = f"问{index}号" + draw(_TEXT)
    kind = draw(st.sampled_from(["empty", "adds", "holds-title", "inside-title"]))
    if kind == "empty":
        detail = ""
    elif kind == "adds":
        detail = draw(_TEXT)
    elif kind == "holds-title":
        detail = draw(_TEXT) + title + draw(_TEXT)
    else:
        start = draw(st.integers(0, len(title)))
        detail = title[start : draw(st.integers(start, len(title)))]
    return title, detail


@st.composite
def _case(draw):
    first, second = draw(st.permutations(list(SHAPES)))[:2]
    count = draw(st.integers(1, 6))
    return first, second, [draw(_question(i)) for i in range(count)]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)  # the same cases every run, nothing written
@given(case=_case())
def test_any_questions_in_any_two_shapes_are_kept_once_with_one_id_and_split(case):
    first, second, questions = case
    with tempfile.TemporaryDirectory(prefix="identity-") as tmp:  # one folder per drawn case, gone after it
        _check(Path(tmp), first, second, questions)
