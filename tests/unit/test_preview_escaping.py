"""Nothing a table record holds can inject Markdown or HTML into the pull-request comment.

Endpoint names, errors, field names, causes (and stack names, regions) are arbitrary text here.
The rendered comment is checked as text (table rows whole, no raw ``<``, no mention) and as what a
GFM renderer makes of it (markdown-it, which rich ships with): only the tags the template writes,
one cell per column, and each cell reads back as the value.
"""

from __future__ import annotations

import html
import re
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from gco_infra.preview import OPS, Change, StackPreview, render_markdown

HOSTILE = st.sampled_from([
    "|", "\\|", "\\", "`", "``", "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))",
    "![i](http://x/i.png)", "\n", "\r\n", "\u2028", "\x85", "\x0b", "@octocat", "@org/team", "*", "**b**", "_i_",
    "~~s~~", "$x$", "&lt;", "&#60;", "# h", "- item", "1. item", "    code", "> quote", "---", "\u202e", "<!--",
])
VALUE = st.one_of(st.text(max_size=40), st.lists(st.one_of(HOSTILE, st.text(max_size=6)), max_size=6).map("".join))
CHANGE = st.builds(Change, endpoint=VALUE, op=st.sampled_from(OPS), resource=VALUE,
                   fields=st.lists(VALUE, max_size=7), cause=VALUE)
PREVIEW = st.builds(StackPreview, stack=VALUE, region=VALUE, changes=st.lists(CHANGE, max_size=4),
                    invalid=st.dictionaries(VALUE, st.lists(VALUE, min_size=1, max_size=2), max_size=3),
                    error=st.none() | VALUE)

TEMPLATE_TAGS = {"h2", "h3", "p", "blockquote", "ul", "li", "strong", "code", "table", "thead", "tbody", "tr", "th", "td"}
SEPARATOR = "|---|---|---|---|---|"


def as_cell(value: str) -> str:
    """What a cell shows for ``value``: breaks, controls and format characters become spaces, runs
    of spaces one, no leading or trailing space."""
    out = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in value)
    return re.sub(" +", " ", out).strip()


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def table_rows(md: str) -> list[list[str]]:
    """Each table's body rows, in order."""
    lines = md.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line == SEPARATOR:
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            tables.append(rows)
    return tables


def rendered_cells(md: str) -> list[list[list[str]]]:
    """Per table, per body row, the text of each cell as a GFM renderer shows it."""
    out = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    tables = []
    for body in re.findall(r"<tbody>(.*?)</tbody>", out, re.S):
        tables.append([[html.unescape(re.sub(r"<[^>]+>", "", cell)).replace("\u200b", "").strip()
                        for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
                       for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)])
    return tables


@settings(max_examples=200, deadline=None)
@given(st.lists(PREVIEW, min_size=1, max_size=3))
def test_table_values_cannot_inject_markdown_or_html(previews):
    md = render_markdown(previews)
    with_changes = [p for p in previews if p.changes]

    # As text: whole rows of five cells, one per change; no raw "<"; no "@" that mentions.
    tables = table_rows(md)
    assert [len(rows) for rows in tables] == [len(p.changes) for p in with_changes]
    for rows in tables:
        for row in rows:
            assert row.startswith("| ") and row.endswith(" |") and unescaped_pipes(row) == 6, row
    assert "<" not in md
    assert all(md[i + 1:].startswith("&#8203;") for i, ch in enumerate(md) if ch == "@")
    # A value never starts a line: one heading per region, every line one the template writes.
    assert sum(line.startswith("### ") for line in md.splitlines()) == len(previews)
    for line in md.splitlines():
        assert line == "" or line.startswith(("## ", "### ", "> ", "| ", SEPARATOR, "This preview reads", "No changes",
                                              "Invalid records", "... and ")), line

    # As rendered: only the template's tags, and each cell shows its value, nothing more.
    out = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    assert set(re.findall(r"<(\w+)", out)) <= TEMPLATE_TAGS, out
    for p, rows in zip(with_changes, rendered_cells(md)):
        assert len(rows) == len(p.changes)
        for c, cells in zip(p.changes, rows):
            assert len(cells) == 5, cells
            assert cells[0] == as_cell(c.endpoint)
            assert cells[1] == as_cell(c.cause)
            assert cells[3] == as_cell(c.resource)
            shown = [as_cell(f) for f in c.fields[:6]]
            assert cells[4] == (", ".join(shown) + (f" (+{len(c.fields) - 6})" if len(c.fields) > 6 else "")).strip()


def test_a_hostile_record_renders_inert():
    name = "x|y`<script>alert(1)</script>\n| injected | row |\n@octocat [a](javascript:alert(1))"
    p = StackPreview(stack="s", region="r", changes=[
        Change(endpoint=name, op="delete", resource=f"Ingress/{name}", fields=[name], cause="table")],
        invalid={name: [f'endpoint "{name}": spec.image is required']}, error=None)
    md = render_markdown([p])
    assert "<script>" not in md and "\n| injected" not in md and "@octocat" not in md
    assert "[a](javascript:" not in md and "\\[a\\](javascript:" in md  # shown, not linked
    assert "&lt;script&gt;" in md and "@&#8203;octocat" in md
    assert [len(rows) for rows in table_rows(md)] == [1]


def test_plain_names_keep_their_code_format():
    p = StackPreview(stack="us-east-1", region="us-east-1", changes=[
        Change(endpoint="llama3", op="update", resource="Deployment/llama3",
               fields=["spec.template.spec.containers[0].image"], cause="code")])
    md = render_markdown([p])
    assert "| `llama3` | code | update | Deployment/llama3 | `spec.template.spec.containers[0].image` |" in md
    assert "### us-east-1 (stack `us-east-1`)" in md
