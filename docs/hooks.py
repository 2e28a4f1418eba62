"""MkDocs hooks: one torch thread for the executed examples; Sphinx roles as code.

The examples' networks are tiny: one intra-op thread runs them fastest, and several
threads fighting over a small or shared machine's cores run them many times slower
(measured: a digits geodesic fit takes 4 s of CPU with one thread, up to 99 s with
two on two busy cores). The gallery executes the examples in this process.

Docstrings follow numpydoc, whose prose may say :class:`X` or :meth:`y`; Markdown
renders that as ``:class:<code>X</code>``. The second hook drops the role, and with a
leading ``~`` keeps only the last dotted component, as Sphinx does.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|obj|data|exc):<code>(~?)([^<]*)</code>")


def _replace(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_config(config: object, **kwargs: object) -> None:
    import torch

    torch.set_num_threads(1)


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_replace, html)
