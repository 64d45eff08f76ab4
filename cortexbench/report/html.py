"""The Markdown of cortexbench's reports as one self-contained HTML page.

``to_html(markdown, base_dir, title)`` converts what the reports write, and only that: headings (``#`` to
``####``, with GitHub's anchors, so that ``[Warnings](#warnings)`` works), paragraphs, ``- `` lists (an
item's indented lines continue it), GitHub tables with their alignment, fenced code blocks, and inline
``**bold**``, ```code```, ``[links](url)`` and ``![images](file.png)``.  Every image is read from
``base_dir`` and embedded as a ``data:`` URI, and the CSS is inline, so the page needs no other file and
no network; an image that is missing or outside ``base_dir`` is said in the page instead.

Plain Python (no Markdown package).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 background:#fff;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.7em;border-bottom:1px solid #d8dee4;padding-bottom:.3em}
h2{font-size:1.35em;border-bottom:1px solid #d8dee4;padding-bottom:.25em;margin-top:1.6em}
h3{font-size:1.1em;margin-top:1.3em}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:#f3f4f6;
 padding:.1em .3em;border-radius:4px}
pre{background:#f6f8fa;padding:12px 14px;overflow-x:auto;border-radius:6px}
pre code{background:none;padding:0}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:4px 9px;white-space:nowrap}
th{background:#f6f8fa}
tr:nth-child(even) td{background:#fafbfc}
.l{text-align:left}.r{text-align:right;font-variant-numeric:tabular-nums}.c{text-align:center}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #e5e7eb}
figcaption{color:#57606a;font-size:.85em}
.missing{color:#9a3412;background:#fff7ed;padding:6px 10px;border-radius:4px}
"""

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_IMAGE_LINE = re.compile(r"^\s*!\[([^\]]*)\]\(([^)\s]+)\)\s*$")


def slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def data_uri(path: Path) -> str:
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _Page:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.embedded: list[str] = []
        self.missing: list[str] = []

    def image_file(self, src: str) -> Path | None:
        """``src`` as a file under ``base_dir`` (None for a URL, a path outside it, or a missing file)."""
        if "://" in src or src.startswith(("data:", "/")):
            return None
        path = (self.base_dir / src).resolve()
        if self.base_dir not in path.parents or not path.is_file():
            return None
        return path

    def image(self, alt: str, src: str) -> str:
        path = self.image_file(src)
        if path is None:
            self.missing.append(src)
            return f'<span class="missing">image {html.escape(src)} is not in {html.escape(str(self.base_dir))}</span>'
        self.embedded.append(src)
        return f'<img src="{data_uri(path)}" alt="{html.escape(alt, quote=True)}">'

    def inline(self, text: str) -> str:
        """Inline Markdown: code spans first (their content is literal), then images, links and bold."""
        out = []
        for k, part in enumerate(_CODE.split(text)):
            if k % 2:
                out.append(f"<code>{html.escape(part)}</code>")
                continue
            images: list[str] = []

            def keep(m: re.Match[str], images: list[str] = images) -> str:
                images.append(self.image(m.group(1), m.group(2)))
                return f"\x00{len(images) - 1}\x00"

            s = html.escape(_IMAGE.sub(keep, part), quote=False)
            s = _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2), quote=True)}">{m.group(1)}</a>', s)
            s = _BOLD.sub(r"<strong>\1</strong>", s)
            s = re.sub("\x00(\\d+)\x00", lambda m, images=images: images[int(m.group(1))], s)
            out.append(s)
        return "".join(out)


def _cells(line: str) -> list[str]:
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s)]


def _is_rule(line: str) -> bool:
    cells = _cells(line)
    return bool(cells) and all(re.fullmatch(r":?-{1,}:?", c) for c in cells)


def _align(rule: str) -> str:
    rule = rule.strip()
    return "c" if rule.startswith(":") and rule.endswith(":") else "r" if rule.endswith(":") else "l"


def _table(page: _Page, lines: list[str]) -> str:
    header = _cells(lines[0])
    aligns = [_align(c) for c in _cells(lines[1])]
    aligns += ["l"] * (len(header) - len(aligns))

    def row(cells: list[str], tag: str) -> str:
        cells = cells + [""] * (len(header) - len(cells))
        return "<tr>" + "".join(f'<{tag} class="{a}">{page.inline(c)}</{tag}>'
                                for c, a in zip(cells, aligns, strict=False)) + "</tr>"

    body = "".join(row(_cells(x), "td") for x in lines[2:])
    return f"<table><thead>{row(header, 'th')}</thead><tbody>{body}</tbody></table>"


def convert(markdown: str, base_dir: Path) -> tuple[str, list[str], list[str]]:
    """(the body's HTML, the images embedded, the images missing) of ``markdown``."""
    page = _Page(base_dir)
    lines = markdown.splitlines()
    out: list[str] = []
    para: list[str] = []
    items: list[list[str]] = []

    def flush() -> None:
        if para:
            out.append("<p>" + page.inline(" ".join(x.strip() for x in para)) + "</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join("<li>" + page.inline(" ".join(x.strip() for x in it)) + "</li>"
                                        for it in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        m = _HEADING.match(line)
        if m:
            flush()
            level, text = len(m.group(1)), m.group(2).strip()
            out.append(f'<h{level} id="{slug(text)}">{page.inline(text)}</h{level}>')
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(page, lines[i:j]))
            i = j
            continue
        m = _IMAGE_LINE.match(line)
        if m:
            flush()
            alt = m.group(1)
            caption = f"<figcaption>{html.escape(alt)}</figcaption>" if alt else ""
            out.append(f"<figure>{page.image(alt, m.group(2))}{caption}</figure>")
            i += 1
            continue
        if line.startswith(("- ", "* ")):
            if para:
                flush()
            items.append([line[2:]])
        elif items and line.startswith("  "):
            items[-1].append(line)
        else:
            if items:
                flush()
            para.append(line)
        i += 1
    flush()
    return "\n".join(out), page.embedded, page.missing


def to_html(markdown: str, base_dir: Path, title: str) -> str:
    """The whole page: ``markdown`` converted, its images embedded from ``base_dir``, the CSS inline."""
    body, _, _ = convert(markdown, base_dir)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
            "</main>\n</body>\n</html>\n")
