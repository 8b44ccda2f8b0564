"""Blocks → one self-contained HTML page (cell tones as CSS classes, PNGs embedded as data
URIs, so the single file works as an MLflow artifact)."""

from __future__ import annotations

import base64
import html as _html
import re

from mlproject.compare.render.blocks import Heading, Image, Items, Para, Table

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #d0d7de;padding:4px 8px;font-size:13px}
th{background:#f6f8fa}
td.r{text-align:right;font-variant-numeric:tabular-nums}
.good,.up{color:#1ABD76}.bad,.down,.worst{color:#E33D30}.worst{font-weight:bold}
.gold::before{content:"🥇"}.silver::before{content:"🥈"}.bronze::before{content:"🥉"}
img{max-width:900px;display:block;margin:8px 0}
"""


def to_html(blocks: list, title: str, images: dict[str, bytes]) -> str:
    esc = _html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Items):
            if b.title:
                parts.append(f"<p><b>{esc(b.title)}</b>{'' if b.items else ': none'}</p>")
            if b.items:
                parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b.items)
                             + "</ul>")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.columns)
            head = "".join(f"<th>{esc(c)}</th>" for c in b.columns)
            body = []
            for row in b.rows:
                tds = []
                for cell, a in zip(row, align, strict=False):
                    cls = " ".join(x for x in ("r" if a == "r" else "", cell.tone or "") if x)
                    tds.append(f"<td class='{cls}'>{esc(cell.text)}</td>" if cls
                               else f"<td>{esc(cell.text)}</td>")
                body.append("<tr>" + "".join(tds) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
                         "</tbody></table>")
        elif isinstance(b, Image) and b.name in images:
            data = base64.b64encode(images[b.name]).decode("ascii")
            parts.append(f"<figure><img alt='{esc(b.caption)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{esc(b.caption)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown we use in paragraphs: **bold** and `code`."""
    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)
