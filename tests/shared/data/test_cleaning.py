"""shared/data/cleaning.py: HTML, control characters, whitespace, length limits."""

import pytest

from shared.data.cleaning import clean_text, length_problem


@pytest.mark.parametrize(
    "raw, clean",
    [
        pytest.param("押金应当退还。", "押金应当退还。", id="clean-text-unchanged"),
        pytest.param("  前后空格 \t", "前后空格", id="trim"),
        pytest.param("A&amp;B &lt;合同&gt;", "A&B <合同>", id="entities"),
        pytest.param("退还&amp;nbsp;押金", "退还 押金", id="double-escaped-entity"),
        pytest.param("&#x4f60;&#22909;", "你好", id="numeric-entities"),
        pytest.param("第一条<br>第二条<br/>第三条", "第一条\n第二条\n第三条", id="br-to-newline"),
        pytest.param("<p>段落一</p><p>段落二</p>", "段落一\n\n段落二", id="paragraphs-keep-a-blank-line"),
        pytest.param('<span style="x">加粗</span>的<b>字</b>', "加粗的字", id="inline-tags-dropped"),
        pytest.param("未满<18岁的人", "未满<18岁的人", id="less-than-not-a-tag"),
        pytest.param("a<!-- 注释 -->b", "ab", id="html-comment"),
        pytest.param("有\x00空\x07字\x1b符", "有空字符", id="nul-and-controls"),
        pytest.param("全角\u3000空格\u00a0与不换行", "全角 空格 与不换行", id="exotic-spaces"),
        pytest.param("零\u200b宽\ufeff字符", "零宽字符", id="zero-width"),
        pytest.param("多   个\t\t空格", "多 个 空格", id="space-runs"),
        pytest.param("行一  \n  行二", "行一\n行二", id="line-edges"),
        pytest.param("段一\n\n\n\n段二", "段一\n\n段二", id="blank-lines-capped"),
        pytest.param("行一\r\n行二\r行三", "行一\n行二\n行三", id="crlf-and-cr"),
        pytest.param("行\u2028分隔", "行\n分隔", id="unicode-line-separator"),
        pytest.param("，。？！", "，。？！", id="full-width-punctuation-kept"),
        pytest.param(" \t\u3000 ", "", id="whitespace-only-becomes-empty"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize(
    "text, minimum, maximum, reason",
    [
        pytest.param("", 2, 10, "empty_answer", id="empty"),
        pytest.param("是", 2, 10, "answer_too_short", id="short"),
        pytest.param("是的", 2, 10, None, id="at-minimum"),
        pytest.param("一" * 10, 2, 10, None, id="at-maximum"),
        pytest.param("一" * 11, 2, 10, "answer_too_long", id="long"),
    ],
)
def test_length_problem_counts_characters(text, minimum, maximum, reason):
    assert length_problem(text, "answer", minimum, maximum) == reason
