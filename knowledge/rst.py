"""reStructuredText (and Sphinx sources, ``.rst.txt``) into clean sections.

docutils parses the markup; what it does not know — Sphinx's directives (``versionadded``,
``py:function``, ``code-block``…) and roles (``:func:``, ``:ref:``…) — would otherwise come out
as error nodes holding the raw markup (``.. %%%%`` comments, ``:func:`len``` in the text of an
answer). Every unknown name found in the source is registered first with a generic handler
that keeps its readable content (a role's text, a directive's argument and body, code as
code), and the doctree is turned into text by node type: comments, link targets, substitution
definitions and error messages dropped, lists as lists, literal blocks fenced as code.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any

from docutils import nodes
from docutils.core import publish_doctree
from docutils.parsers.rst import Directive, directives, roles

#: Directives whose body is code, kept verbatim.
#: Extensions' code directives too: Pallets' ``click:example`` / ``click:run`` (Click's and
#: Flask's docs), IPython's and Jupyter's cells — read as prose, their lines became
#: "sentences" of a quote ('confirmation_prompt=True ) def encode(password):').
_CODE_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "highlight",
    "literalinclude", "productionlist", "click:example", "click:run", "ipython",
    "jupyter-execute", "code-cell",
}  # fmt: skip
#: Directives that are only navigation or machinery: nothing a reader asks about.
_SKIP_DIRECTIVES = {
    "toctree", "index", "highlight", "literalinclude", "include", "autosummary",
    "currentmodule", "module", "moduleauthor", "sectionauthor", "tabularcolumns", "only",
    "raw", "meta", "testsetup", "testcleanup", "contents", "automodule", "autoclass",
    "autofunction", "automethod", "graphviz", "image", "figure",
}  # fmt: skip
#: Sphinx's object descriptions ("description units"): each documents one name — a config
#: value, a function, an option — and becomes a section titled by its signature, so a user who
#: asks about ``TEMPLATES_AUTO_RELOAD`` gets the passage that defines it, headed by the name,
#: rather than the section's opening or a page that mentions the name in passing.
_DESCRIPTIONS = {
    "data", "function", "class", "method", "attribute", "decorator", "exception", "property",
    "classmethod", "staticmethod", "decoratormethod", "confval", "envvar", "option",
    "cmdoption", "describe", "object",
}  # fmt: skip
#: Python-domain descriptions: Sphinx's anchor is the dotted name under the current module.
_PY_OBJECTS = _DESCRIPTIONS - {"confval", "envvar", "option", "cmdoption", "describe", "object"}
#: Roles Sphinx renders as code.
_CODE_ROLES = re.compile(
    r"^(?:\w+:)?(?:func|meth|class|mod|attr|data|const|exc|obj|type|member|macro|var|enum"
    r"|option|envvar|program|command|file|samp|kbd|code|term|keyword|token|regexp|mimetype)$"
)
_DIRECTIVE_NAME = re.compile(r"^\s*\.\.\s+([\w][\w:.+-]*)\s*::", re.M)
_ROLE_NAME = re.compile(r"(?<![\w`]):([\w][\w:+.-]*):`")
_TITLE_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)


class _AnyOption(dict[str, object]):
    """An option spec that accepts every option (Sphinx directives have many).

    Truthy though empty: docutils parses a directive's ``:option:`` lines only when its spec
    is. An empty dict is falsy, and ``.. module:: time`` followed by ``:synopsis: Time
    access…`` took the synopsis into the module's name — every anchor of the Python
    documentation read ``time\\n:synopsis: Time access and conversions..sleep``.
    """

    def __bool__(self) -> bool:
        return True

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Any:
        return directives.unchanged


class _Generic(Directive):
    """Keeps what a reader would see of a directive docutils does not know."""

    optional_arguments = 1
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOption()

    def run(self) -> list[nodes.Node]:
        label = self.name.split(":")[-1]
        if label in ("module", "currentmodule") and self.arguments:
            self.state.document["chinwag-module"] = self.arguments[0].split()[0]
        if self.name in _SKIP_DIRECTIVES:
            return []
        if label in _DESCRIPTIONS and self.arguments:
            return [self._described(label)]
        out: list[nodes.Node] = []
        if self.name in _CODE_DIRECTIVES:
            if self.content:
                out.append(nodes.literal_block(text="\n".join(self.content)))
            return out
        if self.arguments:  # a version, a title
            lead = self.arguments[0]
            if label in ("versionadded", "versionchanged", "deprecated"):
                lead = f"{label.replace('version', '').capitalize() or label} in version {lead}"
            out.append(nodes.paragraph(text=lead))
        if self.content:
            box = nodes.container()
            self.state.nested_parse(self.content, self.content_offset, box)
            out.append(box)
        return out

    def _described(self, label: str) -> nodes.section:
        signature = " ".join(self.arguments[0].splitlines()[0].split())
        bare = re.split(r"[\s(\[=]", signature, maxsplit=1)[0]  # the name as written
        c_domain = self.name.split(":")[0] in ("c", "cpp")
        document = self.state.document
        owner = document.get("chinwag-class")
        title = signature
        if c_domain:
            # ``c:function:: PyObject* PyList_New(Py_ssize_t len)``: the name is the last word
            # before the parameters, and Sphinx's anchor is ``c.PyList_New``.
            words = re.findall(r"[A-Za-z_]\w*", signature.split("(")[0])
            anchor = f"c.{words[-1]}" if words else ""
        elif label in _PY_OBJECTS:
            module = document.get("chinwag-module")
            module = module if module and module != "None" else ""
            member = owner and label not in ("class", "exception", "function", "data", "decorator")
            name = f"{owner}.{bare}" if member else bare  # a member: under its class's trail
            unqualified = bool(module) and not name.startswith(module + ".")
            if unqualified and not member:
                # Shown as Sphinx shows it: ``time.sleep(secs)``, not ``sleep(secs)`` — the
                # name users type and a model's guess at the answer spells out.
                title = f"{module}.{signature}"
            anchor = f"{module}.{name}" if unqualified else name
        elif label == "envvar":
            anchor = f"envvar-{signature.split()[0]}"
        else:
            anchor = ""  # the enclosing section's is linked (see parse)
        section = nodes.section(ids=[anchor] if anchor else [])
        section += nodes.title(text=title)
        if self.content:
            if label in ("class", "exception") and not c_domain:
                # Members described in a class's body are its members: ``threading.Event.wait``.
                document["chinwag-class"] = bare
            try:
                self.state.nested_parse(self.content, self.content_offset, section)
            finally:
                document["chinwag-class"] = owner
        return section


class _ClassOrDescription(_Generic):
    """``.. class::`` is docutils' own directive (a CSS class for the next element); Sphinx
    renames that one ``rst-class`` and reads ``class`` as a Python class's description.

    Left to docutils, every class of a Sphinx source lost its description — "A Counter is a
    dict subclass for counting hashable objects" was not in the knowledge base — and its
    methods landed in the section around it. So in a Sphinx source (``_SPHINX``) it describes
    a class; elsewhere docutils' meaning stands.
    """

    def run(self) -> list[nodes.Node]:
        if _SPHINX.get():
            return super().run()
        from docutils.parsers.rst.directives.misc import Class

        if not self.arguments:
            return []
        return Class(
            self.name, self.arguments, self.options, self.content, self.lineno,
            self.content_offset, self.block_text, self.state, self.state_machine,
        ).run()  # fmt: skip


#: Whether the document being parsed is a Sphinx source (see ``_ClassOrDescription``).
_SPHINX: ContextVar[bool] = ContextVar("chinwag_rst_sphinx", default=False)
#: Markup only Sphinx knows: its Python-domain roles and module directives.
_SPHINX_MARKS = re.compile(
    r"^\s*\.\.\s+(?:py:)?(?:module|currentmodule|function|method|versionadded|versionchanged)::"
    r"|:(?:py:)?(?:func|meth|class|mod|attr|exc|ref|doc):`",
    re.M,
)


def _generic_role(
    name: str, rawtext: str, text: str, lineno: int, inliner: Any,
    options: dict[str, Any] | None = None, content: list[str] | None = None,
) -> tuple[list[nodes.Node], list[Any]]:  # fmt: skip
    """``:ref:`Title <label>``` → "Title"; ``:func:`~os.path.join``` → ``join()``."""
    text = nodes.unescape(text)
    m = _TITLE_TARGET.match(text)
    shown = m.group(1) if m and m.group(1) else text
    shown = shown.lstrip("!")
    if shown.startswith("~"):
        shown = shown[1:].split(".")[-1]
    if _CODE_ROLES.match(name):
        if name.split(":")[-1] in ("func", "meth") and not shown.endswith(")"):
            shown += "()"
        return [nodes.literal(rawtext, shown)], []
    return [nodes.Text(shown)], []


def _register_unknown(source: str) -> None:
    # Registering is process-wide and idempotent; only names docutils does not know, and
    # ``class``, which reads each document as it is (``_ClassOrDescription``).
    directives.register_directive("class", _ClassOrDescription)
    for name in set(_DIRECTIVE_NAME.findall(source)):
        if name not in directives._directive_registry and name not in directives._directives:
            directives.register_directive(name, _Generic)
    for name in set(_ROLE_NAME.findall(source)):
        if name not in roles._role_registry and name not in roles._roles:
            roles.register_local_role(name, _generic_role)


_DROP = (
    nodes.comment,
    nodes.target,
    nodes.system_message,
    nodes.substitution_definition,
    nodes.raw,
    nodes.pending,
    nodes.footnote,
    nodes.citation,
)


def _text(node: nodes.Node) -> str:
    """Readable text of a body element and its children (not of nested sections)."""
    if isinstance(node, (*_DROP, nodes.section, nodes.title)):
        return ""
    if isinstance(node, nodes.literal_block | nodes.doctest_block):
        return "```\n" + node.astext().rstrip() + "\n```"
    if isinstance(node, nodes.problematic):  # markup docutils could not resolve
        return re.sub(r"^:[\w:+.-]+:`|`_*$|^`|\|", "", node.astext())
    if isinstance(node, nodes.bullet_list | nodes.enumerated_list):
        items = []
        for i, item in enumerate(node.children, 1):
            mark = "-" if isinstance(node, nodes.bullet_list) else f"{i}."
            items.append(f"{mark} " + _join(item).replace("\n", "\n  "))
        return "\n".join(items)
    if isinstance(node, nodes.definition_list_item):
        term = " ".join(_text(c) for c in node.children if isinstance(c, nodes.term))
        body = " ".join(_join(c) for c in node.children if isinstance(c, nodes.definition))
        return f"{term}: {body}".strip(": ")
    if isinstance(node, nodes.field):
        name, body = node.children[0], node.children[1]
        return f"{_text(name)}: {_join(body)}"
    if isinstance(node, nodes.Admonition):
        kind = node.tagname.replace("admonition", "").capitalize() or "Note"
        return f"{kind}: {_join(node)}"
    if isinstance(node, nodes.row):
        return " | ".join(_join(entry) for entry in node.children)
    if isinstance(node, nodes.TextElement):  # prose: source line breaks are not breaks
        return " ".join("".join(_inline(c) for c in node.children).split())
    return _join(node)


def _inline(node: nodes.Node) -> str:
    if isinstance(node, _DROP):
        return ""
    if isinstance(node, nodes.problematic):
        return _text(node)
    if isinstance(node, nodes.Text):
        return str(node)
    return "".join(_inline(c) for c in node.children)


def _join(node: nodes.Node) -> str:
    parts = [_text(c) for c in node.children]
    tabular = isinstance(node, nodes.tbody | nodes.thead | nodes.tgroup | nodes.table)
    sep = "\n" if tabular else "\n\n"
    return sep.join(p for p in parts if p.strip())


def parse(source: str, fallback_title: str) -> list[tuple[list[str], str, str]]:
    """``(heading trail, text, anchor)`` per section, in document order.

    The anchor is the section's id as docutils (and so Sphinx's HTML) writes it — "Debug
    Mode" → ``debug-mode`` — so a citation can link to the very section; "" for the text
    before the first heading.
    """
    _register_unknown(source)
    sphinx = _SPHINX.set(bool(_SPHINX_MARKS.search(source)))
    try:
        doctree = _doctree(source)
    finally:
        _SPHINX.reset(sphinx)
    out: list[tuple[list[str], str, str]] = []

    def walk(node: nodes.Node, trail: list[str], anchor: str) -> None:
        text = _join(node)
        if text.strip():
            out.append((trail or [fallback_title], text, anchor))
        for child in _sections_in(node):
            title = child.next_node(nodes.title)
            ids = child.get("ids") or []
            # The title's own id comes first, an explicit label (".. _name:") after it.
            # The label is the one to link: Sphinx always writes it into the page, while
            # a title id that clashes with it is renamed ("decimal-notes-1").
            walk(child, [*trail, _text_of_title(title)], ids[-1] if ids else anchor)

    walk(doctree, [], "")
    return out


def _doctree(source: str) -> nodes.document:
    return publish_doctree(
        source,
        settings_overrides={
            "report_level": 5,
            "halt_level": 5,
            "file_insertion_enabled": False,
            "raw_enabled": False,
            "doctitle_xform": False,
            "warning_stream": False,
        },
    )


def _sections_in(node: nodes.Node) -> list[nodes.section]:
    """The sections below ``node``: its own subsections, and descriptions nested in its body
    (a method inside a class's description, a config value inside a note)."""
    found: list[nodes.section] = []
    for child in node.children:
        if isinstance(child, nodes.section):
            found.append(child)
        elif isinstance(child, nodes.Element):
            found.extend(_sections_in(child))
    return found


def _text_of_title(title: nodes.title | None) -> str:
    return "".join(_inline(c) for c in title.children).strip() if title is not None else ""
