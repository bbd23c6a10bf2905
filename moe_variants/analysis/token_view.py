"""Text coloured by first-choice expert (Mixtral Figure 8), as self-contained HTML.

Each token is a ``<span>`` with an inline background colour for its expert and a tooltip naming the expert;
styles are inline so a snippet can be pasted into a W&B HTML panel, a notebook or a page on its own.
Whitespace is shown as it is in the text: SentencePiece ``▁`` and byte-level ``Ġ`` become spaces, ``Ċ`` and
byte-fallback ``<0x0A>`` newlines (with a faint ``↵`` so that newline tokens stay visible and coloured).
"""

from __future__ import annotations

import colorsys
import html
import re
from collections.abc import Sequence
from typing import Any

# 20 light, mutually distinguishable backgrounds (Tableau-20 lightened) that keep black text readable.
PALETTE = (
    "#8ec1ea", "#ffbe7d", "#8fd18f", "#f59c9c", "#c6b0e0", "#d2aa9f", "#f5b8df", "#c7c7c7",
    "#e0e07a", "#87dbe6", "#2f86c4", "#ff9f1c", "#3fae49", "#e3494f", "#9467bd", "#a87a6c",
    "#e377c2", "#8c8c8c", "#bcbd22", "#17becf",
)  # fmt: skip

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_NEWLINE_MARK = '<span style="opacity:0.35">\u21b5</span>'


def expert_color(expert: int) -> str:
    """Background colour of an expert: the fixed palette, then golden-ratio hues beyond 20 experts."""
    if expert < len(PALETTE):
        return PALETTE[expert]
    hue = (expert * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.75, 0.6)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def piece_text(piece: str) -> str:
    """The text a vocabulary piece stands for: ``▁``/``Ġ`` -> space, ``Ċ`` -> newline, ``<0x0A>`` -> byte."""
    m = _BYTE.match(piece)
    if m:
        code = int(m.group(1), 16)
        return chr(code) if code < 0x80 else piece  # lone bytes of a multi-byte character stay as written
    return piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n").replace("\u0109", "\t")


def _token_span(piece: str, expert: int) -> str:
    text = piece_text(piece)
    body = html.escape(text).replace("\n", _NEWLINE_MARK + "\n")
    tip = html.escape(f"expert {expert}: {piece!r}", quote=True)
    return f'<span style="background:{expert_color(expert)}" title="{tip}">{body}</span>'


def token_html(
    pieces: Sequence[str], first_expert: Sequence[int] | Any, num_experts: int, title: str | None = None
) -> str:
    """One HTML snippet: the tokens coloured by first-choice expert, with a legend.

    Args:
        pieces: the token strings (vocabulary pieces, e.g. ``tokenizer.convert_ids_to_tokens(ids)``).
        first_expert: first-choice expert per token (list or 1-D tensor/array), same length as ``pieces``.
        num_experts: E, the number of legend entries.
        title: optional heading (e.g. ``"layer 15"``), HTML-escaped.

    Returns:
        A ``<div>`` string; whitespace and newlines are preserved (``white-space: pre-wrap``).
    """
    experts = [int(e) for e in (first_expert.tolist() if hasattr(first_expert, "tolist") else first_expert)]
    if len(experts) != len(pieces):
        raise ValueError(f"{len(pieces)} pieces but {len(experts)} expert ids")
    if any(not 0 <= e < num_experts for e in experts):
        raise ValueError(f"expert ids must be in [0, {num_experts})")
    legend = " ".join(
        f'<span style="background:{expert_color(e)};padding:0 0.4em;border-radius:3px">{e}</span>'
        for e in range(num_experts)
    )
    parts = ['<div class="moe-token-view" style="margin:1em 0;font-family:sans-serif">']
    if title is not None:
        parts.append(f'<h3 style="margin:0.2em 0">{html.escape(title)}</h3>')
    parts.append(f'<div style="font-size:0.85em;margin-bottom:0.4em">first-choice expert: {legend}</div>')
    parts.append(
        '<pre style="white-space:pre-wrap;word-wrap:break-word;font-family:monospace;line-height:1.5;margin:0">'
        + "".join(_token_span(p, e) for p, e in zip(pieces, experts))
        + "</pre>"
    )
    parts.append("</div>")
    return "\n".join(parts)


def token_html_page(sections: Sequence[str], title: str = "Routing by first-choice expert") -> str:
    """A complete HTML page joining several :func:`token_html` snippets (e.g. one per layer)."""
    body = "\n<hr>\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f'<h2 style="font-family:sans-serif">{html.escape(title)}</h2>\n{body}\n</body>\n</html>\n'
    )
