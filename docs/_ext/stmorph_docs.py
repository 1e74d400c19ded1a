"""Sphinx directives that build reference pages from the code itself.

``.. stmorph-cli::``
    The command-line reference, read from :func:`stmorph.cli.build_parser` at build time: every
    sub-command's usage, description and options (grouped as ``--help`` groups them), so the page
    cannot disagree with ``stmorph COMMAND --help``.
``.. stmorph-api:: MODULE``
    An autosummary table of ``MODULE.__all__`` followed by the autodoc entry of each name, so every
    public function of ``stmorph.read``, ``im``, ``tl``, ``pl`` and ``ev`` is documented.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_list(parser: argparse.ArgumentParser) -> list[nodes.Node]:
    """One definition list per argument group: flags and metavar as the term, the help as the definition."""
    formatter = parser._get_formatter()
    out: list[nodes.Node] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        out.append(nodes.rubric(text=group.title or "options"))
        dl = nodes.definition_list()
        for action in actions:
            term = nodes.term()
            term += nodes.literal(text=formatter._format_action_invocation(action))
            definition = nodes.definition()
            if isinstance(action, argparse._SubParsersAction):
                commands = nodes.bullet_list()
                for choice in action._choices_actions:
                    item = nodes.paragraph()
                    item += nodes.reference("", f"stmorph {choice.dest}", refid=nodes.make_id(f"stmorph-{choice.dest}"))
                    item += nodes.Text(f": {choice.help}")
                    commands += nodes.list_item("", item)
                definition += commands
            else:
                definition += nodes.paragraph(text=formatter._expand_help(action) if action.help else "")
            dl += nodes.definition_list_item("", term, definition)
        out.append(dl)
    return out


class CliDirective(SphinxDirective):
    """The ``stmorph`` command line, one section per sub-command."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        # argparse wraps usage lines at the terminal's width: fix it for the page, then put it back
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"
        try:
            return self._sections()
        finally:
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns

    def _sections(self) -> list[nodes.Node]:
        from stmorph import cli

        parser = cli.build_parser()
        out: list[nodes.Node] = [nodes.literal_block(text=parser.format_usage().strip())]
        out.extend(_option_list(parser))
        for name, sub in _subcommands(parser).items():
            section = nodes.section(ids=[nodes.make_id(f"stmorph-{name}")])
            section += nodes.title(text=f"stmorph {name}")
            section += nodes.literal_block(text=sub.format_usage().strip())
            # The module docstring is RST; argparse's copy of it has the markup stripped for the terminal.
            doc = inspect.getdoc(importlib.import_module(f"stmorph.cli._{name}")) or sub.description or ""
            body = nodes.container()
            nested_parse_with_titles(self.state, StringList(doc.splitlines(), source=f"stmorph.cli._{name}"), body)
            section.extend(body.children)
            section.extend(_option_list(sub))
            out.append(section)
        return out


class ApiDirective(SphinxDirective):
    """``autosummary`` of a module's ``__all__``, then the autodoc entry of each public name."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        names = [n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)]
        lines = [f".. currentmodule:: {modname}", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in names]
        lines.append("")
        for n in names:
            obj = getattr(module, n)
            if inspect.isclass(obj):
                lines += [f".. autoclass:: {n}", "   :members:", ""]
            elif callable(obj):
                lines += [f".. autofunction:: {n}", ""]
            else:
                lines += [f".. autodata:: {n}", "   :no-value:", ""]
        body = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=modname), body)
        return body.children


def setup(app):
    app.add_directive("stmorph-cli", CliDirective)
    app.add_directive("stmorph-api", ApiDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
