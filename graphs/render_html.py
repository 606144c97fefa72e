"""A self-contained HTML page around a rendered SVG: hover details and a table of top edges.

The page loads nothing: no external CSS, scripts, fonts or images, and a Content-Security-Policy
(``default-src 'none'``) that only allows its own inline style and the one inline script, pinned by
its SHA-256 hash. The details shown on hover are embedded as JSON in a
``<script type="application/json">`` block whose ``<``, ``>`` and ``&`` are written as ``\\u003c``
etc., so no string in the data can close the script element or start markup; the viewer script
writes details with ``textContent`` only, never as HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from graphs.render_style import xml_text

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cc-data").textContent);
  var box = document.getElementById("cc-details");
  var hot = null;
  function show(id) {
    var rows = data.items[id];
    if (!rows) { return; }
    while (box.firstChild) { box.removeChild(box.firstChild); }
    for (var i = 0; i < rows.length; i++) {
      var dt = document.createElement("dt");
      dt.textContent = rows[i][0];
      var dd = document.createElement("dd");
      dd.textContent = rows[i][1];
      box.appendChild(dt);
      box.appendChild(dd);
    }
  }
  function highlight(id) {
    if (hot) { hot.classList.remove("cc-hot"); }
    hot = document.getElementById(id);
    if (hot) { hot.classList.add("cc-hot"); }
    show(id);
  }
  Object.keys(data.items).forEach(function (id) {
    var el = document.getElementById(id);
    if (el) { el.addEventListener("mouseenter", function () { highlight(id); }); }
  });
  var rows = document.querySelectorAll("tr[data-target]");
  for (var i = 0; i < rows.length; i++) {
    (function (row) {
      row.addEventListener("mouseenter", function () { highlight(row.getAttribute("data-target")); });
    })(rows[i]);
  }
})();
""".strip()

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1em; color: #222; }
#cc-layout { display: flex; align-items: flex-start; gap: 1em; }
#cc-figure { flex: 1 1 auto; overflow: auto; border: 1px solid #ddd; }
#cc-figure svg { max-width: 100%; height: auto; }
#cc-side { flex: 0 0 18em; position: sticky; top: 1em; border: 1px solid #ddd; padding: 0.5em; font-size: 0.9em; }
#cc-details { display: grid; grid-template-columns: auto 1fr; gap: 0.15em 0.6em; margin: 0; }
#cc-details dt { color: #666; }
#cc-details dd { margin: 0; font-family: monospace; word-break: break-all; }
.cc-hot path, .cc-hot polygon, .cc-hot ellipse { stroke: #ff9900 !important; stroke-width: 3px; }
table.cc-top { border-collapse: collapse; margin-top: 1em; font-size: 0.9em; }
table.cc-top th, table.cc-top td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
table.cc-top td.num { text-align: right; font-family: monospace; }
table.cc-top tr[data-target]:hover { background: #fff3d6; }
""".strip()


@dataclass(frozen=True)
class Page:
    """Everything the viewer shows besides the SVG (all plain text: escaped here)."""

    title: str
    subtitle: Sequence[str]
    items: Mapping[str, Sequence[tuple[str, str]]]  # SVG element id -> (field, value) rows shown on hover
    table_caption: str
    table_header: Sequence[str]
    table_rows: Sequence[tuple[str, Sequence[str]]]  # (SVG element id, cells)


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def script_json(value: object) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or JS line breaks."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))  # lone surrogates too
    for raw in "<>&":  # U+2028 / U+2029 are escaped already (ensure_ascii)
        text = text.replace(raw, f"\\u{ord(raw):04x}")
    return text


def inline_svg(svg: str) -> str:
    """The ``<svg>`` element of dot's output without the XML prolog, DOCTYPE (a URL) and comments."""
    start = svg.find("<svg")
    if start < 0:
        raise ValueError("dot output holds no <svg> element")
    return svg[start:].strip()


def _text(value: str) -> str:
    return xml_text(value, limit=None)


def html_page(svg: str, page: Page) -> str:
    """The complete, self-contained HTML document."""
    csp = f"default-src 'none'; style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_SCRIPT)}; img-src data:"
    subtitle = "".join(f'<p class="cc-sub">{_text(line)}</p>\n' for line in page.subtitle)
    head_cells = "".join(f"<th>{_text(cell)}</th>" for cell in page.table_header)
    body_rows = []
    for target, cells in page.table_rows:
        tds = "".join(
            f'<td class="num">{_text(c)}</td>' if _numeric(c) else f"<td>{_text(c)}</td>" for c in cells
        )
        body_rows.append(f'<tr data-target="{html.escape(target, quote=True)}">{tds}</tr>')
    data = script_json({"items": {key: [list(row) for row in rows] for key, rows in page.items.items()}})
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(page.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_text(page.title)}</h1>\n{subtitle}"
        '<div id="cc-layout">\n<div id="cc-figure">\n'
        f"{inline_svg(svg)}\n</div>\n"
        '<aside id="cc-side"><strong>details</strong> <small>(hover a node, an edge or a table row)</small>'
        '<dl id="cc-details"></dl></aside>\n</div>\n'
        f'<table class="cc-top">\n<caption>{_text(page.table_caption)}</caption>\n'
        f"<thead><tr>{head_cells}</tr></thead>\n<tbody>\n" + "\n".join(body_rows) + "\n</tbody>\n</table>\n"
        f'<script type="application/json" id="cc-data">{data}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
