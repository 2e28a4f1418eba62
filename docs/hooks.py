"""MkDocs hook: render Sphinx cross-reference roles left in docstrings as code.

Docstrings follow numpydoc, whose prose may say :class:`X` or :meth:`y`; Markdown
renders that as ``:class:<code>X</code>``. This hook drops the role, and with a
leading ``~`` keeps only the last dotted component, as Sphinx does.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|obj|data|exc):<code>(~?)([^<]*)</code>")


def _replace(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_replace, html)
