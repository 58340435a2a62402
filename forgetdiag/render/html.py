"""Self-contained HTML pages: plotly.js embedded once, every user-supplied string escaped.

A page opens offline (no CDN). Text that comes from users (probe prompts, checkpoint names,
paths) goes through :func:`esc`; figures are serialised by plotly, whose JSON escapes ``</``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from forgetdiag._version import __version__
from forgetdiag.render.fmt import MISSING, missing
from forgetdiag.render.output import write_atomic

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2933;background:#f7f8fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.25rem;margin:28px 0 8px;border-bottom:1px solid #d9dee5;padding-bottom:4px}
.sub{color:#52606d;margin:0 0 16px} .note{color:#52606d;font-size:.92rem}
.banner{padding:14px 18px;border-radius:8px;font-size:1.1rem;margin:12px 0;border:1px solid}
.banner.spurious{background:#e6f6ec;border-color:#57ae5b} .banner.real{background:#fdecea;border-color:#d64545}
.banner.mixed{background:#fff7e0;border-color:#e6a700} .banner.none,.banner.info{background:#eef2f7;border-color:#9aa5b1}
table{border-collapse:collapse;margin:8px 0;font-size:.9rem;background:#fff}
th,td{border:1px solid #d9dee5;padding:4px 8px;text-align:right} th{background:#eef2f7}
td.l,th.l{text-align:left} code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
pre{background:#fff;border:1px solid #d9dee5;padding:8px;overflow-x:auto;white-space:pre-wrap}
.plot{background:#fff;border:1px solid #d9dee5;margin:8px 0}
footer{color:#7b8794;font-size:.8rem;margin-top:32px}
"""


def esc(text: Any) -> str:
    """HTML-escape any value shown on a page."""
    return html.escape(str(text), quote=True)


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def figure(fig, *, height: int | None = None) -> str:
    """A plotly figure as an HTML fragment (plotly.js is embedded once by :func:`page`)."""
    if height is not None:
        fig.update_layout(height=height)
    div = fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True, "displaylogo": False})
    return f'<div class="plot">{div}</div>'


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned. Every cell is escaped."""
    cls = lambda k: ' class="l"' if k < left else ""
    head = "".join(f"<th{cls(k)}>{esc(c)}</th>" for k, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(k)}>{esc(_fmt(v))}</td>" for k, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if missing(value):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def paragraph(text: str, *, cls: str | None = None) -> str:
    return f"<p{f' class={esc(cls)!r}' if cls else ''}>{esc(text)}</p>"


def banner(text: str, kind: str) -> str:
    return f'<div class="banner {esc(kind)}">{esc(text)}</div>'


def code(text: str) -> str:
    return f"<pre><code>{esc(text)}</code></pre>"


@dataclass
class Section:
    """A titled part of a page, made of HTML fragments built with the helpers above."""

    title: str
    parts: list[str] = field(default_factory=list)

    def render(self) -> str:
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.title.lower())
        return f'<section id="{esc(slug)}"><h2>{esc(self.title)}</h2>{"".join(self.parts)}</section>'


def page(title: str, sections: Sequence[Section], *, subtitle: str | None = None, header: Sequence[str] = ()) -> str:
    """A complete, offline HTML document."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    body = "".join(s.render() for s in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{_plotly_js()}</script></head>'
        f"<body><main><h1>{esc(title)}</h1>{sub}{''.join(header)}{body}"
        f"<footer>forgetdiag {esc(__version__)}</footer></main></body></html>"
    )


def write_page(path: str | Path, title: str, sections: Sequence[Section], **kwargs) -> Path:
    """Write :func:`page` atomically to ``path``."""
    return write_atomic(path, page(title, sections, **kwargs))
