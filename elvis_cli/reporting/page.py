"""The HTML of a results page: self-contained (styles and the one script inline, no fonts,
scripts or images from the network), every link relative, so the folder opens from disk.

Each page shows a block of queries; per query its top results before re-ranking (the global
order) and after it side by side, with scores and rank changes, coloured by the ground truth
where there is one. A script counts the images the browser loaded into `#images-loaded` (its
`data-loaded` and `data-total`), which is what the browser test reads back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import PurePath

from elvis_cli.reporting.folder import GENERATOR, page_name
from elvis_cli.reporting.labels import POSITIVE, GroundTruthLabels
from elvis_cli.reporting.rankings import Entry, QueryRanking

EXPLAIN_FOLDER = "explain"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; margin: 0 0 .4em; }
h3 { font-size: .85em; margin: .2em 0; color: #555; font-weight: normal; }
.note { color: #555; font-size: .9em; }
table.summary { border-collapse: collapse; font-size: .8em; margin: .6em 0; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; white-space: pre; }
img.curve { max-width: 520px; width: 100%; }
nav { margin: 1em 0; } nav a, nav span { margin-right: .5em; } nav span { font-weight: bold; }
section.query { border-top: 1px solid #ddd; padding: .8em 0; }
.row { display: flex; gap: 1em; align-items: flex-start; }
figure.query { margin: 0; width: 130px; flex: none; font-size: .75em; }
ol.strip { list-style: none; display: flex; gap: 6px; padding: 0; margin: 0; overflow-x: auto; }
ol.strip li { flex: none; width: 86px; font-size: .72em; border: 3px solid transparent;
  padding: 2px; background: #f6f6f6; }
ol.strip img, figure.query img { display: block; max-width: 100%; max-height: 80px; margin: auto; }
li.positive { border-color: #1a9641 !important; } li.negative { border-color: #d7191c !important; }
li.junk { border-color: #999 !important; border-style: dashed !important; }
.up { color: #1a9641; } .down { color: #d7191c; } .name { color: #666; word-break: break-all; }
.missing { height: 60px; display: flex; align-items: center; justify-content: center; color: #999; }
.legend span { padding: 0 .4em; margin-right: .5em; border: 3px solid; }
"""

_COUNT_LOADED = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.getElementById("images-loaded");
  out.setAttribute("data-loaded", loaded);
  out.setAttribute("data-total", images.length);
  out.textContent = loaded + " of " + images.length + " images loaded";
});
"""


@dataclass(frozen=True)
class PageContent:
    """What every page of one report shares."""

    title: str
    source: str  # the results file, as the user named it
    labels: GroundTruthLabels | None
    thumbnails: Mapping[str, str]  # image path -> thumbnail name, for those made
    explained: frozenset[str]  # explain pictures that exist in the folder
    pages: int
    summary: str = ""  # HTML of the evaluation summary, shown on the first page


def explain_picture_name(query_path: str, gallery_path: str) -> str:
    """Where the explain picture of a pair lies in the report folder:
    `explain/<query>__<gallery>.png`, by the images' file names (characters other than
    letters, digits, `.`, `-` and `_` replaced by `_`)."""
    def safe(path: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", PurePath(path).stem)

    return f"{EXPLAIN_FOLDER}/{safe(query_path)}__{safe(gallery_path)}.png"


def render_page(content: PageContent, number: int, queries: Sequence[QueryRanking]) -> str:
    """Page `number` of the report, holding `queries`."""
    navigation = _navigation(content.pages, number)
    if content.labels is not None:
        truth = (f"Ground truth: {escape(content.labels.description)}. Borders: "
                 '<span class="legend"><span style="border-color:#1a9641">positive</span>'
                 '<span style="border-color:#d7191c">negative</span>'
                 '<span style="border-color:#999;border-style:dashed">junk</span></span>'
                 " (no border: not in the ground truth).")
    else:
        truth = "No ground truth given: results are not coloured."
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(content.title)}</h1>",
        f'<p class="note">Results: {escape(content.source)}. Before: the global ranking '
        "(by global score); after: re-ranked (by fused score). ▲/▼: places gained or lost "
        f"by re-ranking.</p><p class=\"note\">{truth}</p>",
        content.summary if number == 1 else "",
        navigation,
        *(_query_section(content, query) for query in queries),
        navigation,
        '<p class="note" id="images-loaded"></p>',
        f"<script>{_COUNT_LOADED}</script></body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _navigation(pages: int, current: int) -> str:
    if pages == 1:
        return ""
    links = (f"<span>{number}</span>" if number == current
             else f'<a href="{page_name(number)}">{number}</a>' for number in range(1, pages + 1))
    return f"<nav>Pages: {' '.join(links)}</nav>"


def _query_section(content: PageContent, query: QueryRanking) -> str:
    counts = ""
    if content.labels is not None:
        found = [sum(content.labels.label(query.query_path, entry.gallery_path) == POSITIVE
                     for entry in entries) for entries in (query.before, query.after)]
        counts = (f'<p class="note">positives in the top {len(query.after)}: '
                  f"{found[0]} before, {found[1]} after</p>")
    return (f'<section class="query"><h2>{escape(query.query_path)}</h2><div class="row">'
            f'<figure class="query">{_image(content, query.query_path)}{counts}</figure>'
            '<div><h3>before: global ranking</h3>'
            f'<ol class="strip">{_items(content, query, query.before, after=False)}</ol>'
            '<h3>after: re-ranked</h3>'
            f'<ol class="strip">{_items(content, query, query.after, after=True)}</ol>'
            "</div></div></section>")


def _items(content: PageContent, query: QueryRanking, entries: Sequence[Entry],
           after: bool) -> str:
    return "".join(_item(content, query, entry, after) for entry in entries)


def _item(content: PageContent, query: QueryRanking, entry: Entry, after: bool) -> str:
    label = (content.labels.label(query.query_path, entry.gallery_path)
             if content.labels is not None else "")
    if after:
        rank, change = entry.rank_after, entry.rank_before - entry.rank_after
        moved = (f'<span class="up">▲{change}</span>' if change > 0 else
                 f'<span class="down">▼{-change}</span>' if change < 0 else "=")
        score = (f"score {entry.score:.3f} (raw {entry.raw_score:.1f})" if entry.reranked
                 else f"global {entry.global_score:.3f}, not re-ranked")
    else:
        rank, moved = entry.rank_before, f"→ #{entry.rank_after}"
        score = f"global {entry.global_score:.3f}"
    explain = explain_picture_name(query.query_path, entry.gallery_path)
    link = (f' <a class="explain" href="{escape(explain)}">explain</a>'
            if explain in content.explained else "")
    return (f'<li class="{label}">{_image(content, entry.gallery_path)}<b>#{rank}</b> '
            f"{moved}<br>{score}{link}</li>")


def _image(content: PageContent, path: str) -> str:
    name = escape(PurePath(path).name)
    thumbnail = content.thumbnails.get(path)
    if thumbnail is None:
        return f'<div class="missing">{name}</div><span class="name">{name}</span><br>'
    return (f'<img src="{escape(thumbnail)}" alt="{name}" title="{escape(path)}">'
            f'<span class="name">{name}</span><br>')


def summary_html(table_html: str | None, curve: str | None) -> str:
    """The evaluation summary of the first page: the evaluate table (HTML) and the runtime
    curve (a picture in the folder), each where the evaluation wrote one."""
    if table_html is None and curve is None:
        return ""
    parts = ["<h2>Evaluation</h2>"]
    if table_html is not None:
        parts.append(table_html)
    if curve is not None:
        parts.append(f'<img class="curve" src="{escape(curve)}" alt="mAP against re-ranking '
                     'time per query">')
    return "<section>" + "".join(parts) + "</section>"
