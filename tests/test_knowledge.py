"""The knowledge base: real documents in, relevant passages out, nothing lost on the way."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from knowledge.base import KnowledgeBase, KnowledgeError
from knowledge.index import VectorIndex

DATA = Path(__file__).parent / "data"


@pytest.fixture
def kb(tmp_path, embedder) -> KnowledgeBase:
    base = KnowledgeBase(tmp_path / "kb", embedder=embedder)
    yield base
    base.close()


def test_a_paraphrased_question_finds_its_faq_pair_in_the_top_3(faq_kb):
    cases = [json.loads(line) for line in (DATA / "faq_paraphrases.jsonl").read_text().splitlines()]
    assert len(cases) >= 30
    results = faq_kb.search_many([c["question"] for c in cases], k=3)
    hits = [
        c["id"] in [p.meta["record"] for p in found]
        for c, found in zip(cases, results, strict=True)
    ]
    misses = [c["question"] for c, hit in zip(cases, hits, strict=True) if not hit]
    assert sum(hits) / len(hits) >= 0.9, misses


def test_passages_carry_text_score_source_and_heading_trail(faq_kb, faq_file):
    (best,) = faq_kb.search("How long does it take to get a building permit?", k=1)
    assert best.source == str(faq_file)
    assert best.headings[:2] == ["faq-en", "bygglov"]
    assert best.text.startswith("Q: ") and "\nA: " in best.text
    assert 0.5 < best.score <= 1.0
    assert best.meta["record"] == "bygglov-002"


def test_nothing_relevant_is_an_empty_result_not_a_guess(faq_kb):
    assert faq_kb.search("Who won the 1998 football world cup final?", k=3) == []
    assert faq_kb.search("What is the capital of France?", k=3) == []


def test_filters_restrict_by_source_and_heading(faq_kb):
    found = faq_kb.search("deduction", k=5, filters={"heading": "rut-avdrag"}, min_score=0.0)
    assert found and all("rut-avdrag" in p.headings for p in found)
    assert faq_kb.search("deduction", k=5, filters={"source": "*.md"}, min_score=0.0) == []


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


SPHINX_SOURCE = """\
.. %%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%
.. _decimal-notes:

Decimal notes
=============

.. index:: single: decimal

The :mod:`decimal` module provides fast correctly rounded
decimal arithmetic; see :ref:`the tutorial <tut-decimal>` and :func:`~decimal.getcontext`.

.. versionadded:: 3.3

.. note::

   Contexts are per thread.

Rounding
--------

Use :meth:`Decimal.quantize` to round:

.. code-block:: python
   :emphasize-lines: 2

   from decimal import Decimal
   Decimal("7.325").quantize(Decimal(".01"))
"""


def test_sphinx_sources_are_read_as_documents_without_their_markup(tmp_path):
    from knowledge.loaders import load

    sections = load(write(tmp_path / "_sources" / "library.rst.txt", SPHINX_SOURCE))
    assert [s.headings for s in sections] == [["Decimal notes"], ["Decimal notes", "Rounding"]]
    intro, rounding = (s.text for s in sections)
    assert intro.startswith("The decimal module provides fast correctly rounded decimal")
    assert "the tutorial and getcontext()." in intro  # roles keep their text, lose the markup
    assert "Note: Contexts are per thread." in intro
    assert "Added in version 3.3" in intro
    everything = intro + rounding
    for markup in ("%%%", ".. _", ":mod:", ":ref:", "<tut-decimal>", ".. index", "::", "`"):
        assert markup not in everything.replace("```", ""), markup
    # Code stays code, whole and fenced; its directive options are gone.
    assert '```\nfrom decimal import Decimal\nDecimal("7.325").quantize' in rounding
    assert "emphasize" not in rounding


def test_code_in_sphinx_extensions_directives_stays_code(tmp_path):
    """Click's docs show their examples in ``click:example`` / ``click:run``; read as prose,
    a quote came out as 'confirmation_prompt=True ) def encode(password):'."""
    from knowledge.loaders import load

    source = (
        "Prompts\n=======\n\nThis is useful for password input:\n\n.. click:example::\n\n"
        "    @click.command()\n    @click.password_option()\n    def encrypt(password):\n"
        "        click.echo(password)\n\nRun it:\n\n.. click:run::\n\n"
        "    invoke(encrypt, input=['secret'])\n"
    )
    (section,) = load(write(tmp_path / "_sources" / "prompts.rst.txt", source))
    assert section.text == (
        "This is useful for password input:\n\n```\n@click.command()\n"
        "@click.password_option()\ndef encrypt(password):\n    click.echo(password)\n```"
        "\n\nRun it:\n\n```\ninvoke(encrypt, input=['secret'])\n```"
    )


def test_markdown_is_parsed_setext_headings_code_and_links_included(tmp_path):
    from knowledge.loaders import load

    text = (
        "Getting started\n===============\n\nInstall with `pip install chinwag`; see "
        "[the docs](https://example.org/docs) <b>now</b>.\n\nConfiguration\n-------------\n\n"
        '```toml\n# not a heading\nname = "x"\n```\n\n| option | default |\n|---|---|\n'
        "| name | chinwag |\n"
    )
    sections = load(write(tmp_path / "guide.md", text))
    assert [s.headings for s in sections] == [
        ["Getting started"],
        ["Getting started", "Configuration"],
    ]
    assert sections[0].text == "Install with pip install chinwag; see the docs now."
    assert '```\n# not a heading\nname = "x"\n```' in sections[1].text
    assert "name | chinwag" in sections[1].text


def test_sections_know_their_anchor_in_the_published_page(tmp_path):
    from knowledge.loaders import load

    rst = load(write(tmp_path / "_sources" / "library.rst.txt", SPHINX_SOURCE))
    assert [s.meta.get("anchor") for s in rst] == ["decimal-notes", "rounding"]
    md = load(
        write(tmp_path / "guide.md", "# Guide\n\nHi.\n\n## Set up!\n\nA.\n\n## Set up!\n\nB.\n")
    )
    assert [s.meta.get("anchor") for s in md] == ["guide", "set-up", "set-up-1"]  # GitHub's
    html = load(
        write(
            tmp_path / "page.html",
            '<html><body><div id="content"><section id="install"><h2>Install</h2><p>Run it.</p>'
            "</section><h2>Loose</h2><p>No id here.</p></div></body></html>",
        )
    )
    assert [(s.headings[-1], s.meta.get("anchor")) for s in html] == [
        ("Install", "install"),
        ("Loose", None),
    ]


def test_citations_name_the_folder_and_link_where_the_docs_are_published(tmp_path, embedder):
    sources = tmp_path / "html" / "_sources"
    write(
        sources / "deploying" / "gunicorn.rst.txt",
        "Gunicorn\n========\n\nRunning\n-------\n\nRun gunicorn -w 4.\n",
    )
    write(tmp_path / "notes" / "faq.md", "# Hours\n\nOpen nine to five.\n")
    kb = KnowledgeBase(
        tmp_path / "kb", embedder=embedder, links={str(sources): "https://docs.example.org/2.2/"}
    )
    try:
        kb.add([sources, tmp_path / "notes"])
        (run,) = kb.search("how do I run it under gunicorn", k=1)
        assert run.where == "deploying/gunicorn.rst.txt"
        assert run.url == "https://docs.example.org/2.2/deploying/gunicorn.html#running"
        (hours,) = kb.search("when are you open", k=1)
        assert hours.where == "notes/faq.md" and hours.url is None  # no link configured
    finally:
        kb.close()


def test_every_supported_format_is_read_with_its_headings(kb, tmp_path):
    docs = tmp_path / "docs"
    write(
        docs / "guide.md",
        "# Guide\n\nIntro text.\n\n## Returns\n\nParcels can be returned within 30 days.\n",
    )
    write(
        docs / "manual.rst",
        "Manual\n======\n\nWarranty\n--------\n\nThe warranty lasts two years.\n",
    )
    write(
        docs / "page.html",
        "<html><head><title>Shop</title><script>var tracking = 1;</script></head><body>"
        "<nav>Home | About | Login</nav><main><h1>Shipping</h1><p>We ship to Sweden and Norway.</p>"
        "</main><footer>© shop</footer></body></html>",
    )
    write(docs / "notes.txt", "Opening hours are nine to five on weekdays.")
    write(
        docs / "faq.csv",
        "question,answer\nDo you sell gift cards?,Yes: in any amount from 100 kr.\n",
    )
    write(
        docs / "faq.json",
        json.dumps(
            {"items": [{"question": "Can I pay by invoice?", "answer": "Yes, within 14 days."}]}
        ),
    )
    _make_pdf(docs / "leaflet.pdf", "Our stores close at midnight on Fridays.")
    summary = kb.add([docs])
    assert summary.failed == []
    assert len(summary.added) == 7
    top = lambda q: kb.search(q, k=1)[0]  # noqa: E731
    assert top("How long can I return a parcel?").headings == ["Guide", "Returns"]
    assert top("how long is the warranty").headings == ["Manual", "Warranty"]
    shipping = top("Which countries do you ship to?")
    assert shipping.headings == ["Shop", "Shipping"]
    assert "tracking" not in shipping.text and "Login" not in shipping.text
    assert "gift cards" in top("gift vouchers available?").text
    assert "invoice" in top("pay later with an invoice").text
    assert "midnight" in top("when do stores close on Friday").text
    assert top("when are you open").source.endswith("notes.txt")


def _make_pdf(path: Path, text: str) -> None:
    """A minimal one-page PDF with real text content."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(out))


def test_bad_files_are_skipped_and_listed_never_a_crash(kb, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "good.txt", "Deliveries arrive within three days.")
    write(docs / "empty.txt", "")
    write(docs / "image.png", b"\x89PNG\r\n\x1a\n" + os.urandom(512))
    write(docs / "binary.txt", b"\x00\x01\x02" * 1000)
    write(
        docs / "latin1.txt",
        "Caf\xe9 cr\xe8me br\xfbl\xe9e is our dessert of the day.".encode("latin-1"),
    )
    write(docs / "broken.json", "{not json")
    write(docs / "broken.pdf", b"%PDF-1.4 garbage")
    write(
        docs / "long.md",
        "# Long\n\n" + ("A sentence about pallets and freight. " * 40 + "\n\n") * 20,
    )
    write(docs / "huge.txt", "x" * (3 * 1024 * 1024))
    kb.max_file_bytes = 1024 * 1024
    summary = kb.add([docs, tmp_path / "nope.txt"])
    failed = dict(summary.failed)
    assert failed[str(docs / "empty.txt")] == "empty file"
    assert "unsupported file type .png" in failed[str(docs / "image.png")]
    assert "binary" in failed[str(docs / "binary.txt")]
    assert "invalid JSON" in failed[str(docs / "broken.json")]
    assert "PDF" in failed[str(docs / "broken.pdf")]
    assert "no such file" in failed[str(tmp_path / "nope.txt")]
    assert "larger than the 1 MB limit" in failed[str(docs / "huge.txt")]
    assert {Path(p).name for p in summary.added} == {"good.txt", "latin1.txt", "long.md"}
    assert "crème brûlée" in kb.search("what dessert do you have today", k=1)[0].text
    long = next(p for p in kb.sources() if p["source"].endswith("long.md"))
    assert long["chunks"] >= 20
    tokens = kb.embedder.count_tokens(
        [c.text for c in kb.search("pallets freight", k=5, min_score=0)]
    )
    assert max(tokens) <= 254


def test_ingest_is_incremental_touch_change_delete(kb, tmp_path):
    docs = tmp_path / "docs"
    a = write(docs / "a.md", "# A\n\nThe blue widget costs ten euros.")
    b = write(docs / "b.md", "# B\n\nThe red widget costs twenty euros.")
    first = kb.add([docs])
    assert len(first.added) == 2
    os.utime(a)  # touched, same content
    second = kb.add([docs])
    assert sorted(Path(p).name for p in second.unchanged) == ["a.md", "b.md"]
    assert second.chunks_added == 0
    write(a, "# A\n\nThe blue widget now costs twelve euros.")
    third = kb.add([docs])
    assert [Path(p).name for p in third.updated] == ["a.md"]
    assert "twelve" in kb.search("price of the blue widget", k=1)[0].text
    assert all(
        "ten euros" not in p.text for p in kb.search("blue widget ten euros", k=5, min_score=0)
    )
    b.unlink()
    assert kb.add([docs]).removed == []  # without --sync nothing is removed
    assert kb.add([docs], sync=True).removed == [str(b)]
    assert all("red widget" not in p.text for p in kb.search("red widget", k=5, min_score=0))
    assert kb.stats()["chunks"] == 1


def test_remove_and_list(kb, tmp_path):
    kb.add(
        [
            write(tmp_path / "x.txt", "Xylophones are sold on floor two."),
            write(tmp_path / "y.txt", "Yoyos on floor three."),
        ]
    )
    assert [Path(s["source"]).name for s in kb.sources()] == ["x.txt", "y.txt"]
    assert kb.remove("*x.txt") == 1
    assert [Path(s["source"]).name for s in kb.sources()] == ["y.txt"]
    with pytest.raises(KnowledgeError, match="no ingested source"):
        kb.remove("nothing-like-this")


COOKIE_DOCS = textwrap.dedent("""
    Configuration
    =============

    Sessions
    --------

    Sessions are signed cookies. The browser keeps them until they expire; a session marked
    permanent lasts for ``PERMANENT_SESSION_LIFETIME``, 31 days unless you change it.

    Cookies sent to other sites
    ---------------------------

    ``SESSION_COOKIE_SAMESITE`` restricts how cookies are sent with requests from external
    sites. Set it to ``"Lax"`` (recommended) or ``"Strict"``.

    Secure cookies
    --------------

    Browsers only send cookies marked secure over HTTPS connections. Set the secure flag in
    production so that session cookies never travel in plain text.

    Cookie names
    ------------

    The session cookie is called ``session``; cookies of other parts of the site can have any
    name, and they are sent along with every request to the site.
""")


def test_a_question_naming_a_setting_gets_the_section_that_defines_it_first(kb, tmp_path):
    kb.add([write(tmp_path / "config.rst", COOKIE_DOCS)])
    question = "what does SESSION_COOKIE_SAMESITE do?"
    best = kb.search(question, k=3, min_score=0.0)[0]
    assert best.headings[-1] == "Cookies sent to other sites"
    assert "SESSION_COOKIE_SAMESITE" in best.text
    # Why the keyword list exists: the vectors alone rank a section about cookies in general
    # above the one that names the setting.
    dense = kb.search(question, k=3, min_score=0.0, retrieval="dense")[0]
    assert dense.headings[-1] != "Cookies sent to other sites"
    # Containing the very name asked about makes a passage relevant, whatever the cosine.
    (named,) = kb.search(question, k=1, min_score=0.95)
    assert "SESSION_COOKIE_SAMESITE" in named.text and named.score < 0.95
    assert kb.search("what restricts cookies sent to external sites?", k=1, min_score=0.95) == []


CLI_DOCS = textwrap.dedent("""\
    Command line tools
    ==================

    Options
    -------

    Options are declared with the ``option`` decorator. An option may be given several times
    when ``multiple=True``; its values then arrive as a tuple.

    Help pages
    ----------

    Every command gets a help page. By default only the long flag shows it. To accept the
    short form too, pass ``context_settings={"help_option_names": ["-h", "--help"]}``.

    Verbose output
    --------------

    Counting options such as ``--verbose`` count how often they were given, so ``-vvv`` is 3.

    Testing
    -------

    The test runner invokes a command in isolation and captures what it prints.
""")


def test_a_question_naming_a_short_flag_finds_the_section_that_shows_it(kb, tmp_path):
    """A short flag ("-h") is as much a name as ``--help``: a user asking for it wants the section
    that shows it, however loosely the rest of the question matches."""
    kb.add([write(tmp_path / "cli.rst", CLI_DOCS)])
    (named,) = kb.search("how do I get my tool to answer -h?", k=1, min_score=0.95)
    assert named.headings[-1] == "Help pages"
    assert kb.search("how do I get my tool to answer briefly?", k=1, min_score=0.95) == []


def test_questions_in_plain_words_rank_as_the_vectors_rank_them(faq_kb):
    cases = [json.loads(line) for line in (DATA / "faq_paraphrases.jsonl").read_text().splitlines()]
    questions = [c["question"] for c in cases]
    hybrid = faq_kb.search_many(questions, k=3)
    dense = faq_kb.search_many(questions, k=3, retrieval="dense")
    same = sum(
        [p.chunk_id for p in a] == [p.chunk_id for p in b]
        for a, b in zip(hybrid, dense, strict=True)
    )
    assert same == len(cases)  # none of them has a code-like word: nothing to re-rank


@pytest.mark.parametrize(
    "hostile",
    ['"unbalanced', "NEAR(a b) AND -x", "text: *", "^start col:umn", '`a"b`', 'x_y"z OR'],
)
def test_search_syntax_in_a_message_is_just_text(kb, tmp_path, hostile):
    kb.add([write(tmp_path / "config.rst", COOKIE_DOCS)])
    found = kb.search(f"{hostile} SESSION_COOKIE_SAMESITE", k=2, min_score=0.0)
    assert found and "SESSION_COOKIE_SAMESITE" in found[0].text


SPHINX_API = textwrap.dedent("""\
    Builtin Configuration Values
    ============================

    The following values are read by the application. Added in version 0.11:
    ``TEMPLATES_AUTO_RELOAD``, ``SESSION_REFRESH_EACH_REQUEST``.

    .. py:data:: TEMPLATES_AUTO_RELOAD

        Reload templates when they are changed. If not set, it is enabled in debug mode.

        Default: ``None``

    .. py:data:: SESSION_REFRESH_EACH_REQUEST

        Send the cookie with every response when the session is permanent.

    .. currentmodule:: shop

    .. py:class:: Basket(owner)

        Holds what a customer is about to buy.

        .. py:method:: add(item, quantity=1)

            Puts ``quantity`` of ``item`` in the basket.

    .. envvar:: SHOP_CONFIG

        Path of the configuration file read at start.

    Timers
    ======

    .. module:: clock
       :synopsis: Waiting and timing.

    .. class:: Timer(seconds)

       Calls a function once the given number of seconds has passed.

       .. method:: cancel()

          Stops the timer before it fires.

    .. function:: sleep(secs)

       Suspends the calling thread for the given number of seconds.

    .. c:function:: int Clock_Sleep(double secs)

       The same from C.
""")


def test_each_documented_name_is_its_own_section_headed_and_linked_by_its_name(kb, tmp_path):
    from knowledge.loaders import load

    sections = load(write(tmp_path / "_sources" / "api.rst.txt", SPHINX_API))
    found = {s.headings[-1]: s for s in sections}
    assert found["TEMPLATES_AUTO_RELOAD"].headings == [
        "Builtin Configuration Values",
        "TEMPLATES_AUTO_RELOAD",
    ]
    assert found["TEMPLATES_AUTO_RELOAD"].text.startswith("Reload templates when")
    # Anchors as Sphinx writes them: the dotted name under the current module, envvar-NAME.
    assert found["TEMPLATES_AUTO_RELOAD"].meta["anchor"] == "TEMPLATES_AUTO_RELOAD"
    # Headed as Sphinx shows them, by the name users type: "shop.Basket", "clock.sleep".
    assert found["shop.Basket(owner)"].meta["anchor"] == "shop.Basket"
    assert found["add(item, quantity=1)"].headings[-2:] == [
        "shop.Basket(owner)",
        "add(item, quantity=1)",
    ]
    assert found["add(item, quantity=1)"].meta["anchor"] == "shop.Basket.add"
    assert found["SHOP_CONFIG"].meta["anchor"] == "envvar-SHOP_CONFIG"
    assert "Holds what a customer" in found["shop.Basket(owner)"].text
    assert "Puts" not in found["shop.Basket(owner)"].text  # the method's text is the method's
    # A plain ``.. class::`` is a class in a Sphinx source (docutils' own "class" is
    # ``rst-class`` there), and a module's ``:synopsis:`` is not part of its name.
    assert "Calls a function once" in found["clock.Timer(seconds)"].text
    assert found["clock.Timer(seconds)"].meta["anchor"] == "clock.Timer"
    assert found["cancel()"].meta["anchor"] == "clock.Timer.cancel"
    assert found["clock.sleep(secs)"].meta["anchor"] == "clock.sleep"
    assert found["int Clock_Sleep(double secs)"].meta["anchor"] == "c.Clock_Sleep"
    # Asked by name, the definition comes first — not the changelog line that mentions it.
    kb.add([tmp_path / "_sources"])
    best = kb.search("TEMPLATES_AUTO_RELOAD what is it for", k=1)[0]
    assert best.headings[-1] == "TEMPLATES_AUTO_RELOAD"
    best = kb.search("what does clock.sleep do?", k=1)[0]
    assert best.headings[-1] == "clock.sleep(secs)"


def test_outside_sphinx_sources_the_class_directive_keeps_its_docutils_meaning(tmp_path):
    from knowledge.loaders import load

    plain = "Notes\n=====\n\n.. class:: special\n\nThis paragraph is styled, not a class.\n"
    (section,) = load(write(tmp_path / "notes.rst", plain))
    assert section.headings == ["Notes"]
    assert "This paragraph is styled" in section.text


def test_a_knowledge_base_reads_its_files_again_when_the_reader_changes(kb, tmp_path, monkeypatch):
    from knowledge import ingest

    docs = write(tmp_path / "a.md", "# A\n\nAlpha.\n")
    assert len(kb.add([docs]).added) == 1
    assert len(kb.add([docs]).unchanged) == 1
    # A chinwag whose readers parse differently re-reads the same, unchanged file.
    monkeypatch.setattr(ingest, "READER_VERSION", ingest.READER_VERSION + 1)
    again = kb.add([docs])
    assert not again.unchanged and kb.stats()["chunks"] == 1


def test_removed_documents_leave_no_keyword_hits_and_old_catalogues_are_indexed(kb, tmp_path):
    import sqlalchemy as sa

    kb.add([write(tmp_path / "config.rst", COOKIE_DOCS), write(tmp_path / "b.txt", "Bees.")])
    assert kb.remove("*config.rst") == 4
    assert all(
        "SESSION_COOKIE" not in p.text
        for p in kb.search("SESSION_COOKIE_SAMESITE", 3, min_score=-1)
    )
    kb.add([tmp_path / "config.rst"])
    # A catalogue written before keyword search (and migrations) existed: no FTS table, no
    # state flag, no schema version.
    with kb.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE chunks_fts"))
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(sa.text("DELETE FROM state WHERE key = 'lexical'"))
    kb.close()
    reopened = KnowledgeBase(kb.directory, embedder=kb.embedder)
    try:
        best = reopened.search("what does SESSION_COOKIE_SAMESITE do?", k=1, min_score=0.0)[0]
        assert best.headings[-1] == "Cookies sent to other sites"
    finally:
        reopened.close()


def test_the_index_switches_to_ivf_past_the_threshold_and_stats_says_so(tmp_path, embedder):
    kb = KnowledgeBase(tmp_path / "kb", embedder=embedder, ivf_threshold=40, nprobe=8)
    docs = tmp_path / "docs"
    for i in range(30):
        write(
            docs / f"d{i}.txt", f"Product number {i} is stored in aisle {i % 7} on shelf {i % 5}."
        )
    kb.add([docs])
    assert kb.stats()["index_kind"] == "flat"
    for i in range(30, 60):
        write(
            docs / f"d{i}.txt", f"Product number {i} is stored in aisle {i % 7} on shelf {i % 5}."
        )
    kb.add([docs])
    stats = kb.stats()
    assert (stats["index_kind"], stats["vectors"], stats["nprobe"]) == ("ivf", 60, 8)
    assert stats["switched_to_ivf_at"]
    assert "Product number 42 " in kb.search("where is product number 42", k=3)[0].text + " "


def test_a_corrupt_index_is_detected_with_a_rebuild_hint_and_rebuild_repairs_it(kb, tmp_path):
    kb.add([write(tmp_path / "a.txt", "Refunds take five working days.")])
    (index_file,) = kb.directory.glob("index-*.faiss")
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])  # half-written
    fresh = KnowledgeBase(kb.directory, embedder=kb.embedder)
    with pytest.raises(KnowledgeError, match="rebuild"):
        fresh.open()
    fresh.close()
    repaired = KnowledgeBase(kb.directory, embedder=kb.embedder)
    repaired.rebuild()
    assert "five working days" in repaired.search("how long do refunds take", k=1)[0].text


def test_a_crash_mid_save_leaves_the_last_good_index_loadable(tmp_path, embedder):
    """Kill the ingesting process while it writes the index file, at many moments."""
    directory = tmp_path / "kb"
    base = KnowledgeBase(directory, embedder=embedder)
    base.add([write(tmp_path / "first.txt", "The first document talks about anchors.")])
    base.close()
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from knowledge.base import KnowledgeBase
        from knowledge.index import VectorIndex
        slow_save = VectorIndex.save
        def save(self, path):
            print("saving", flush=True)
            return slow_save(self, path)
        VectorIndex.save = save
        kb = KnowledgeBase(Path({str(directory)!r}))
        docs = [Path({str(tmp_path)!r}) / f"more{{i}}.txt" for i in range(40)]
        for i, d in enumerate(docs):
            d.write_text(f"Extra document {{i}} about bolts, nuts and washers, size {{i}}.")
        kb.add(docs)
        print("done", flush=True)
        """
    )
    for delay in (0.0, 0.005, 0.02, 0.05):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.strip() == "saving":
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        survivor = KnowledgeBase(directory, embedder=embedder)
        found = survivor.search("anchors", k=1)
        assert found and "anchors" in found[0].text
        count = survivor.stats()["vectors"]
        assert count in (1, 41)  # the old index or the new one — never something in between
        survivor.close()


def test_a_killed_ingest_keeps_what_it_committed_and_the_next_one_resumes(tmp_path, embedder):
    directory = tmp_path / "kb"
    for i in range(64):
        write(tmp_path / "docs" / f"{i:02}.txt", f"Note {i}: crane {i} is inspected every spring.")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from knowledge.base import KnowledgeBase
        from knowledge.index import VectorIndex
        saves = 0
        real_save = VectorIndex.save
        def save(self, path):
            global saves
            saves += 1
            digest = real_save(self, path)
            print("saved", saves, flush=True)
            return digest
        VectorIndex.save = save
        kb = KnowledgeBase(Path({str(directory)!r}), commit_chunks=16)
        kb.add([Path({str(tmp_path / "docs")!r})])
        print("done", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("saved 2"):  # the first batch is committed, the second saving
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    resumed = KnowledgeBase(directory, embedder=embedder, commit_chunks=16)
    kept = resumed.stats()["vectors"]
    assert 16 <= kept < 64  # what was committed survived the kill
    summary = resumed.add([tmp_path / "docs"])
    assert len(summary.unchanged) == kept and len(summary.added) == 64 - kept
    assert resumed.stats()["vectors"] == 64
    assert "crane 63" in resumed.search("when is crane 63 inspected", k=1)[0].text
    resumed.close()


def test_searches_keep_working_while_an_ingest_runs(kb, tmp_path):
    kb.add([write(tmp_path / "base.txt", "Invoices are sent on the first of every month.")])
    [
        write(tmp_path / "bulk" / f"{i}.txt", f"Bulk note {i}: forklift {i} is serviced yearly.")
        for i in range(200)
    ]
    results: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def searcher():
        while not done.is_set():
            try:
                found = kb.search("when are invoices sent", k=1)
                results.append(len(found))
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        kb.add([tmp_path / "bulk"])
    finally:
        done.set()
        thread.join()
    assert not errors
    assert len(results) > 5 and all(n == 1 for n in results)
    assert kb.stats()["chunks"] == 201


def test_another_process_ingest_is_picked_up_by_a_running_reader(kb, tmp_path, embedder):
    kb.add([write(tmp_path / "a.txt", "Alpha document about apples.")])
    assert kb.search("apples", k=1)
    writer = KnowledgeBase(kb.directory, embedder=embedder)
    writer.add([write(tmp_path / "b.txt", "Beta document about bananas.")])
    kb._checked = 0.0  # as if a second had passed
    assert "bananas" in kb.search("bananas", k=1)[0].text


def test_vector_index_exact_and_ivf_agree_on_clustered_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32)).astype(np.float32)
    data = centers[rng.integers(0, 50, 5000)] + 0.1 * rng.normal(size=(5000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(5000, dtype=np.int64)
    flat = VectorIndex.build(ids, data, dim=32, ivf_threshold=10**9)
    ivf = VectorIndex.build(ids, data, dim=32, ivf_threshold=100, nprobe=8)
    assert (flat.info.kind, ivf.info.kind) == ("flat", "ivf")
    queries = data[:100]
    _, exact = flat.search(queries, 10)
    _, approx = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_the_knowledge_cli_from_ingest_to_repair(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env["CHINWAG_DATA_DIR"] = str(tmp_path / "data")

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "bot.cli", "knowledge", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )

    docs = tmp_path / "docs"
    write(
        docs / "returns.md",
        "# Returns\n\nYou can return any parcel within 30 days for a full refund.",
    )
    write(docs / "logo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    added = cli("add", str(docs), "--json")
    assert added.returncode == 0, added.stderr
    summary = json.loads(added.stdout)
    assert len(summary["added"]) == 1 and summary["failed"][0]["path"].endswith("logo.png")
    found = json.loads(cli("search", "can I send a parcel back?", "-k", "2", "--json").stdout)
    assert found[0]["headings"] == ["Returns"] and found[0]["score"] > 0.3
    assert "nothing relevant" in cli("search", "quantum chromodynamics lecture notes").stdout
    assert "returns.md" in cli("list").stdout
    stats = json.loads(cli("stats").stdout)
    assert (stats["files"], stats["chunks"], stats["index_kind"]) == (1, 1, "flat")
    (index_file,) = (tmp_path / "data" / "knowledge").glob("index-*.faiss")
    index_file.write_bytes(b"garbage")
    broken = cli("stats")
    assert broken.returncode == 2 and "chinwag knowledge rebuild" in broken.stderr
    assert cli("rebuild").returncode == 0
    assert json.loads(cli("stats").stdout)["vectors"] == 1
    assert "removed 1 chunks" in cli("remove", str(docs / "returns.md")).stdout
    assert json.loads(cli("stats").stdout)["chunks"] == 0
    # An answer an operator taught with /correct is listed, and a deleted one leaves the index.
    from knowledge import taught

    folder = tmp_path / "data" / "knowledge" / taught.FOLDER
    entry = taught.write(folder, "Do you ship abroad?", "Yes, to all of Europe.", author="tg:7")
    assert cli("add", str(folder)).returncode == 0
    (listed,) = json.loads(cli("taught", "--json").stdout)
    assert (listed["question"], listed["author"]) == ("Do you ship abroad?", "tg:7")
    entry.path.unlink()
    assert "removed 1" in cli("add", str(folder), "--sync").stdout
    assert "0 taught answers" in cli("taught").stdout


async def test_skills_search_the_knowledge_base_through_the_bot_without_blocking(
    chinwag_bot, tmp_path, embedder
):
    import asyncio

    service = chinwag_bot.services["knowledge"]
    service.kb.embedder = embedder  # the session's already-loaded model
    doc = write(tmp_path / "hours.txt", "The help desk answers phone calls from eight to four.")
    await asyncio.to_thread(service.kb.add, [doc])
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    found = await service.search("when can I call the help desk?", 1)
    task.cancel()
    assert "eight to four" in found[0].text
    assert ticks > 0  # the event loop kept running while the search worked


def test_question_vectors_can_be_switched_off(tmp_path, embedder):
    faq = write(
        tmp_path / "faq.csv", "question,answer\nDo you ship abroad?,Yes, to all of Europe.\n"
    )
    with_q = KnowledgeBase(tmp_path / "a", embedder=embedder)
    without_q = KnowledgeBase(tmp_path / "b", embedder=embedder, faq_question_vectors=False)
    with_q.add([faq])
    without_q.add([faq])
    assert (with_q.stats()["vectors"], without_q.stats()["vectors"]) == (2, 1)
    assert without_q.search("international shipping?", k=1)[0].text.startswith("Q: Do you ship")


def test_the_first_searches_arriving_at_once_all_see_the_index(faq_kb, embedder):
    """Many chats asking at the moment the bot starts: none may be told "nothing relevant"
    because the index was still loading."""
    from concurrent.futures import ThreadPoolExecutor

    fresh = KnowledgeBase(faq_kb.directory, embedder=embedder)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(
                pool.map(
                    lambda _: fresh.search("How long does it take to get a building permit?", k=1),
                    range(16),
                )
            )
    finally:
        fresh.close()
    assert all(len(r) == 1 for r in results)


def test_bf16_and_fp32_embeddings_are_unit_vectors_with_the_same_neighbours():
    from bot.models.embedding import Embedder

    texts = [
        "How many books can I borrow at a time?",
        "You may borrow up to twelve books at once.",
        "The library opens at nine on weekdays.",
        "Opening hours are 9:00 to 20:00, Monday to Friday.",
        "Late returns cost ten cents a day.",
        "Fines for overdue items are 0.10 per day.",
    ]
    full = Embedder(dtype="float32").encode(texts)
    half = Embedder(dtype="bfloat16").encode(texts)
    assert np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    assert float((full * half).sum(axis=1).min()) > 0.99
    nearest = [np.argsort(-(v @ v.T), axis=1)[:, 1] for v in (full, half)]
    assert nearest[0].tolist() == nearest[1].tolist()


def test_a_long_document_is_ingested_without_a_tokenizer_warning(tmp_path, caplog):
    """Documents are longer than the encoder's 256 tokens by nature; the chunker counts them
    to cut them. transformers' "Token indices sequence length is longer than …" on every
    such ingest would tell the operator something is wrong when nothing is."""
    from bot.models.embedding import Embedder

    long_doc = tmp_path / "guide.md"
    listing = "\n".join(f"    setting_{i} = {i}  # the {i}th option" for i in range(120))
    long_doc.write_text(f"# Guide\n\nA long listing:\n\n```python\n{listing}\n```\n")
    kb = KnowledgeBase(tmp_path / "kb", embedder=Embedder())  # a fresh tokenizer: it warns once
    hf = logging.getLogger("transformers")  # its own handler, not the root's, unless chinwag's
    hf.addHandler(caplog.handler)  # logging set-up made it propagate
    try:
        summary = kb.add([long_doc])
    finally:
        hf.removeHandler(caplog.handler)
    assert summary.chunks_added > 1
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_a_catalogue_from_before_migrations_is_upgraded_in_place_and_keeps_its_chunks(
    tmp_path, embedder
):
    """An operator's index written by an older chinwag opens as it is: no re-ingest."""
    import sqlalchemy as sa

    directory = tmp_path / "old-kb"
    kb = KnowledgeBase(directory, embedder=embedder)
    kb.add([write(tmp_path / "refunds.txt", "Refunds take five working days to arrive.")])
    kb.close()
    # What an older catalogue looked like: no version table, no keyword index, and chunks
    # without the column added later.
    engine = sa.create_engine(f"sqlite:///{directory / 'catalogue.sqlite3'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.exec_driver_sql("DROP TABLE chunks_fts")
        conn.exec_driver_sql("ALTER TABLE chunks DROP COLUMN question_embedding")
        conn.exec_driver_sql("DELETE FROM state WHERE key = 'lexical'")
    engine.dispose()

    reopened = KnowledgeBase(directory, embedder=embedder)
    (hit,) = reopened.search("how long do refunds take", k=1)
    assert "five working days" in hit.text
    assert reopened.search("Refunds", k=1)  # the keyword index was rebuilt too
    with reopened.engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("chunks")}
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert "question_embedding" in columns and version == "k0001"
    reopened.close()


def test_a_catalogue_from_a_newer_chinwag_is_refused_with_a_reason(tmp_path, embedder):
    import sqlalchemy as sa

    directory = tmp_path / "new-kb"
    kb = KnowledgeBase(directory, embedder=embedder)
    kb.add([write(tmp_path / "a.txt", "Anchors hold ships in place.")])
    kb.close()
    engine = sa.create_engine(f"sqlite:///{directory / 'catalogue.sqlite3'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'k9999'")
    engine.dispose()
    with pytest.raises(KnowledgeError, match="newer chinwag"):
        KnowledgeBase(directory, embedder=embedder).search("anchors", k=1)


async def test_a_started_bot_opens_its_knowledge_base_before_the_first_question(
    chinwag_bot, faq_kb
):
    """``chinwag run`` warms the knowledge base up beside the model: the first user's
    question does not wait for the catalogue, the index and the embedder to load (3.5 s on
    the Python documentation's 18,312 chunks)."""
    from knowledge.embedder import Embedder

    cold = KnowledgeBase(faq_kb.directory, embedder=Embedder())
    chinwag_bot.services["knowledge"].kb = cold
    assert not cold._ready and cold.embedder._model is None
    chinwag_bot.warm_up()
    assert await chinwag_bot.warmed(within=300)
    assert cold._ready and cold.embedder._model is not None
    assert chinwag_bot.models.ready


def _tuned(before: str, env: dict[str, str]) -> dict[str, object]:
    """What ``tune_for_batch_work`` sets in a fresh interpreter that ran ``before`` first."""
    code = textwrap.dedent(
        f"""
        import json, os
        {before}
        from bot.process import tune_for_batch_work
        applied = tune_for_batch_work()
        print(json.dumps({{"applied": applied, "omp": os.environ.get("OMP_WAIT_POLICY")}}))
        """
    )
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_ingest_command_runs_as_a_batch_job_but_keeps_what_the_operator_set():
    """``chinwag knowledge add`` lets idle OpenMP threads sleep and keeps big freed blocks in
    the heap (10–16 % fewer CPU-seconds for an ingest); an operator's own OpenMP setting wins,
    and a process that already loaded torch is not told the setting took."""
    fresh = _tuned("", {})
    assert fresh["omp"] == "PASSIVE" and fresh["applied"]["OMP_WAIT_POLICY"] == "PASSIVE"
    if sys.platform.startswith("linux"):
        assert "malloc" in fresh["applied"]

    operator = _tuned("", {"OMP_WAIT_POLICY": "ACTIVE"})
    assert operator["omp"] == "ACTIVE" and "OMP_WAIT_POLICY" not in operator["applied"]

    too_late = _tuned("import torch", {})
    assert too_late["omp"] is None and "OMP_WAIT_POLICY" not in too_late["applied"]
