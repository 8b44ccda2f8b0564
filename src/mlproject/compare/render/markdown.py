"""Blocks → GitHub-flavoured Markdown (medals, 🔻, 🟢 / 🔴 as text around the cell)."""

from __future__ import annotations

from mlproject.compare.render.blocks import NA, Cell, Heading, Image, Items, Para, Table

TONE_MD = {"gold": ("🥇", ""), "silver": ("🥈", ""), "bronze": ("🥉", ""),
           "worst": ("", " 🔻"), "good": ("🟢 ", ""), "bad": ("🔴 ", "")}


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    pre, post = TONE_MD.get(cell.tone or "", ("", ""))
    if cell.text == NA:
        pre, post = "", ""
    return _md_escape(f"{pre}{cell.text}{post}")


def to_markdown(blocks: list) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Items):
            if b.title:
                lines.append(f"**{b.title}**" + ("" if b.items else ": none"))
            lines += [f"- {x}".replace("\n", " ") for x in b.items]
            lines.append("")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.columns)
            lines.append("| " + " | ".join(_md_escape(c) for c in b.columns) + " |")
            lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
            for row in b.rows:
                lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{b.caption}]({b.name})", ""]
    return "\n".join(lines).rstrip() + "\n"
