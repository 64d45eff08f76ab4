"""report/html.py: the Markdown the reports write, as one self-contained HTML page."""

from __future__ import annotations

import base64
import re

from cortexbench.report.html import convert, slug, to_html

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def test_headings_get_githubs_anchors_and_a_link_to_one_works():
    body, _, _ = convert("# cortexbench stream: cached, lru:2\n\n## Mode lru:2\n\nsee [Warnings](#warnings)\n\n"
                         "## Warnings\n", ".")
    assert '<h1 id="cortexbench-stream-cached-lru2">cortexbench stream: cached, lru:2</h1>' in body
    assert '<h2 id="mode-lru2">' in body and '<h2 id="warnings">Warnings</h2>' in body
    assert '<p>see <a href="#warnings">Warnings</a></p>' in body
    assert slug("Peak rate under the SLOs") == "peak-rate-under-the-slos" and slug("Modes against cached") == \
        "modes-against-cached"


def test_tables_keep_their_alignment_and_escaped_pipes():
    md = "| mode | img/s | note |\n|:---|---:|:---:|\n| a\\|b | **437** | `x\\|y` |\n| c | 1 |\n"
    body, _, _ = convert(md, ".")
    assert body.startswith("<table><thead><tr><th class=\"l\">mode</th><th class=\"r\">img/s</th>"
                           "<th class=\"c\">note</th></tr></thead>")
    assert '<td class="l">a|b</td><td class="r"><strong>437</strong></td>' in body
    assert "<code>x|y</code>" in body
    assert '<tr><td class="l">c</td><td class="r">1</td><td class="c"></td></tr>' in body  # short row padded


def test_lists_continue_on_indented_lines_and_text_is_escaped():
    md = "- **Latency** is per image, <b>not</b>\n  a batch & more\n- second `a*b**c**`\n\nafter"
    body, _, _ = convert(md, ".")
    assert body == ("<ul><li><strong>Latency</strong> is per image, &lt;b&gt;not&lt;/b&gt; a batch &amp; more</li>"
                    "<li>second <code>a*b**c**</code></li></ul>\n<p>after</p>")


def test_code_fences_are_literal():
    body, _, _ = convert("```text\n| not | a table |\n# not a heading <x>\n```\n", ".")
    assert body == "<pre><code>| not | a table |\n# not a heading &lt;x&gt;</code></pre>"


def test_images_are_embedded_from_the_base_dir_and_nothing_else_is_reached(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    (tmp_path.parent / "outside.png").write_bytes(PNG)
    md = ("![latency cdf](plot.png)\n\ninline ![p](plot.png) too\n\n![gone](missing.png)\n\n"
          "![up](../outside.png)\n\n![web](https://example.com/x.png)\n")
    page = to_html(md, tmp_path, "t <1>")
    _, embedded, missing = convert(md, tmp_path)
    assert embedded == ["plot.png", "plot.png"] and missing == ["missing.png", "../outside.png",
                                                                 "https://example.com/x.png"]
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)">', page)
    assert [(base64.b64decode(u), alt) for u, alt in uris] == [(PNG, "latency cdf"), (PNG, "p")]
    assert "<figcaption>latency cdf</figcaption>" in page and page.count('class="missing"') == 3
    assert "<title>t &lt;1&gt;</title>" in page and "<style>" in page
    assert not re.search(r"<(link|script)\b|src=\"(?!data:)|url\(", page)  # no other file, no network
