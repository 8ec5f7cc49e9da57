"""The knowledge base as a chinwag plugin: the ``chinwag knowledge …`` commands and the
``knowledge`` service skills search (``bot.services["knowledge"]``)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from bot import hookimpl
from bot.config import Settings
from knowledge import taught
from knowledge.base import KnowledgeBase, KnowledgeError, Passage
from knowledge.config import SECTION, KnowledgeSettings

log = logging.getLogger(__name__)


def from_settings(settings: Settings) -> KnowledgeBase:
    k = settings.section(SECTION, KnowledgeSettings)
    return KnowledgeBase(
        k.directory or settings.data_dir / "knowledge",
        model=k.model,
        device=k.device,
        dtype=k.dtype,
        chunk_tokens=k.chunk_tokens,
        overlap=k.overlap,
        ivf_threshold=k.ivf_threshold,
        nprobe=k.nprobe,
        min_score=k.min_score,
        batch_size=k.batch_size,
        max_file_mb=k.max_file_mb,
        faq_question_vectors=k.faq_question_vectors,
        commit_chunks=k.commit_chunks,
        retrieval=k.retrieval,
        lexical_weight=k.lexical_weight,
        embed_headings=k.embed_headings,
        links=k.links,
    )


class KnowledgeService:
    """Async access for skills: searches run in a worker thread, never on the event loop."""

    def __init__(self, kb: KnowledgeBase, *, teach: bool = True) -> None:
        self.kb = kb
        #: Whether operators' corrections become entries (``knowledge.teach_corrections``).
        self.teaching = teach
        self._taught_lock = asyncio.Lock()

    @property
    def taught_folder(self) -> Path:
        return self.kb.directory / taught.FOLDER

    async def teach(
        self,
        question: str,
        answer: str,
        *,
        author: str,
        asked_by: str | None = None,
        reply_id: int | None = None,
        within_s: float = 20.0,
    ) -> taught.TaughtAnswer | None:
        """Store an operator's answer to ``question`` as an entry and index it.

        The entry is on disk before this returns; indexing it waits at most ``within_s`` (an
        ingest from the command line may hold the index's write lock) and otherwise goes on in
        the background. Returns None when teaching is off; raises :class:`taught.TeachError`
        for an entry that cannot be stored.
        """
        if not self.teaching:
            return None
        entry = await asyncio.to_thread(
            taught.write,
            self.taught_folder,
            question,
            answer,
            author=author,
            asked_by=asked_by,
            reply_id=reply_id,
        )
        task = asyncio.ensure_future(self._index_taught())
        try:
            await asyncio.wait_for(asyncio.shield(task), within_s)
        except TimeoutError:
            log.warning("knowledge: indexing taught answers is waiting for the index; continuing")
            task.add_done_callback(_log_failure)
        return entry

    async def forget_asker(self, who: str) -> int:
        """Remove the entries whose question ``who`` (``platform:user``) asked; how many."""
        paths = await asyncio.to_thread(taught.asked_by, self.taught_folder, who)
        if not paths:
            return 0
        for path in paths:
            path.unlink(missing_ok=True)
        await self._index_taught()
        return len(paths)

    async def _index_taught(self) -> None:
        """Bring the index in line with the taught folder: new and changed entries in, removed
        ones out. The whole folder each time: an entry whose indexing was interrupted (a crash,
        a busy index) is picked up by the next one; unchanged files cost a checksum."""
        async with self._taught_lock:
            summary = await asyncio.to_thread(self.kb.add, [self.taught_folder], sync=True)
        for source, why in summary.failed:
            log.warning("knowledge: taught entry %s not indexed: %s", source, why)

    async def warm_up(self) -> None:
        """Open the catalogue and load the index and the embedder now, not on the first
        question (``Bot.warm_up``; ``chinwag run`` calls it at start)."""
        await asyncio.to_thread(self.kb.search, "warm-up", 1)

    async def search(self, query: str, k: int = 5, **kwargs: Any) -> list[Passage]:
        return await asyncio.to_thread(self.kb.search, query, k, **kwargs)

    async def add(self, paths: list[Path], **kwargs: Any) -> Any:
        """Ingest ``paths`` (scenario files bring their own documents this way)."""
        return await asyncio.to_thread(self.kb.add, paths, **kwargs)

    async def stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.kb.stats)

    async def similarity(self, query: str, texts: list[str]) -> list[float]:
        """Cosine of ``query`` to each text, by the index's own embedder (one batch)."""
        if not texts:
            return []

        def run() -> list[float]:
            vectors = self.kb.embedder.encode([query, *texts])
            return [float(v @ vectors[0]) for v in vectors[1:]]

        return await asyncio.to_thread(run)


def _log_failure(task: asyncio.Future[Any]) -> None:
    """A background indexing of taught answers that failed after its caller stopped waiting:
    the entry is on disk, and the next taught answer (or ``knowledge add``) indexes it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("knowledge: indexing taught answers failed", exc_info=task.exception())


@hookimpl
def register_config(register):
    register(SECTION, KnowledgeSettings)


@hookimpl
def startup(bot):
    # Lazy: the catalogue opens, and the model loads, on the first search.
    k = bot.settings.section(SECTION, KnowledgeSettings)
    bot.services["knowledge"] = KnowledgeService(
        from_settings(bot.settings), teach=k.teach_corrections
    )


@hookimpl
def shutdown(bot):
    service = bot.services.pop("knowledge", None)
    if service is not None:
        service.kb.close()


def _kb() -> KnowledgeBase:
    from bot.cli import settings

    return from_settings(settings(default_level="WARNING"))


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


app = typer.Typer(help="The knowledge base skills answer from.", no_args_is_help=True)


@app.command()
def add(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or globs.")],
    sync: Annotated[
        bool, typer.Option("--sync", help="Remove files that disappeared from the given folders.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ingest documents: text, Markdown, reStructuredText, HTML, PDF, FAQ JSON/JSONL/CSV."""
    from bot.logs import quiet_libraries
    from bot.process import tune_for_batch_work

    tune_for_batch_work()  # a batch job: CPU-seconds count, latency does not
    quiet_libraries()  # our bars, not the embedder's
    kb = _kb()
    try:
        if as_json:
            summary = kb.add(paths, sync=sync)
        else:
            from rich.console import Console

            from bot.progress import stage_bars

            # On stderr: stdout carries the summary (scripts read it); piped, plain lines.
            with stage_bars(Console(stderr=True)) as report:
                summary = kb.add(paths, sync=sync, progress=report)
    except KnowledgeError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        s = summary
        typer.echo(
            f"added {len(s.added)}, updated {len(s.updated)}, unchanged {len(s.unchanged)}, "
            f"removed {len(s.removed)}, failed {len(s.failed)} — {s.chunks_added} chunks in, "
            f"{s.chunks_removed} out, {s.seconds:.1f}s"
        )
        for path, reason in summary.failed:
            typer.echo(f"  skipped {path}: {reason}")
    if summary.failed and not (
        summary.added or summary.updated or summary.unchanged or summary.removed
    ):
        raise typer.Exit(1)


@app.command()
def search(
    query: str,
    k: Annotated[int, typer.Option("-k", help="How many passages.")] = 5,
    source: Annotated[str | None, typer.Option(help="Only sources matching this glob.")] = None,
    min_score: Annotated[
        float | None, typer.Option(help="Override the relevance threshold.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Search the knowledge base as the skills do."""
    kb = _kb()
    try:
        passages = kb.search(
            query, k, filters={"source": source} if source else None, min_score=min_score
        )
    except KnowledgeError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "score": round(p.score, 4),
                        "source": p.source,
                        "headings": p.headings,
                        "position": p.position,
                        "text": p.text,
                        "chunk_id": p.chunk_id,
                    }
                    for p in passages
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    if not passages:
        typer.echo("nothing relevant found")
        return
    for p in passages:
        typer.echo(f"[{p.score:.3f}] {p.title}  ({Path(p.source).name}#{p.position})")
        typer.echo("    " + p.text[:300].replace("\n", "\n    "))


@app.command("list")
def list_sources(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The ingested sources with their chunk counts."""
    rows = _kb().sources()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['chunks']:>6} chunks  {r['source']}")
    typer.echo(f"{len(rows)} sources")


@app.command()
def remove(
    source: Annotated[str, typer.Argument(help="A source as `list` shows it, or a glob.")],
) -> None:
    """Remove a source and its chunks from the index."""
    try:
        n = _kb().remove(source)
    except KnowledgeError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed {n} chunks")


@app.command("taught")
def taught_answers(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The answers operators taught with /correct: question, answer, who, when, the file."""
    kb = _kb()
    entries = taught.entries(kb.directory / taught.FOLDER)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "question": e.question,
                        "answer": e.answer,
                        "author": e.author,
                        "taught_at": e.taught_at,
                        "file": str(e.path),
                    }
                    for e in entries
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    for e in entries:
        answer = e.answer if len(e.answer) <= 200 else e.answer[:197] + "…"
        typer.echo(f"{e.taught_at[:10]}  {e.author}  {e.question}\n    {answer}\n    {e.path}")
    typer.echo(
        f"{len(entries)} taught answer{'' if len(entries) == 1 else 's'} "
        f"(delete a file, then `chinwag knowledge add {kb.directory / taught.FOLDER} --sync`)"
    )


@app.command()
def stats() -> None:
    """Size, index type (flat or IVF), model and version."""
    try:
        typer.echo(json.dumps(_kb().stats(), indent=2))
    except KnowledgeError as exc:
        raise _fail(exc) from None


@app.command()
def rebuild(
    reembed: Annotated[
        bool, typer.Option("--reembed", help="Re-run the embedding model (after changing it).")
    ] = False,
) -> None:
    """Recreate the index from the catalogue (repairs a corrupt index; applies IVF settings)."""
    kb = _kb()
    try:
        # The catalogue alone is opened: the index is what may be broken.
        result = kb.rebuild(reembed=reembed)
    except KnowledgeError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(result, indent=2))


@hookimpl
def register_commands(cli):
    cli.add_typer(app, name="knowledge")
