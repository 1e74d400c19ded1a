"""The documentation site builds offline with no warnings, its references cover the public API and the CLI,
and the README keeps its set-up commands on the first screen."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("furo")
    from sphinx.cmd.build import build_main

    out = tmp_path_factory.mktemp("html")
    doctrees = tmp_path_factory.mktemp("doctrees")
    rc = build_main(["-W", "-q", "-E", "-b", "html", "-d", str(doctrees), str(DOCS), str(out)])
    assert rc == 0, "sphinx-build -W failed: see the warnings above"
    return out


def test_api_reference_covers_public_functions(site):
    import stmorph as st

    for module in (st.read, st.im, st.tl, st.pl, st.ev):
        page = (site / "api" / f"{module.__name__.split('.')[-1]}.html").read_text(encoding="utf-8")
        for name in module.__all__:
            if callable(getattr(module, name)):
                assert f'id="{module.__name__}.{name}"' in page, f"{module.__name__}.{name} is not documented"


def test_cli_reference_is_the_parser(site):
    from stmorph.cli import _COMMANDS, build_parser

    page = (site / "cli.html").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in _COMMANDS:
        assert f"stmorph {command}" in page
        for action in sub.choices[command]._actions:
            for flag in action.option_strings:
                assert flag in page, f"stmorph {command} {flag} is missing from the CLI reference"


def test_nothing_fetched(site):
    conf = (DOCS / "conf.py").read_text(encoding="utf-8")
    assert "sphinx.ext.intersphinx" not in conf
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert '<script src="http' not in text and '<link rel="stylesheet" href="http' not in text, page


def test_readme_first_screen():
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 200
    head = "\n".join(readme[:40])
    assert "make demo" in head and "make test" in head
    assert readme.count("<!-- claims:begin -->") == 1 and readme.count("<!-- claims:end -->") == 1
