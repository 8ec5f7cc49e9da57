"""The ``[knowledge]`` configuration section, declared to the core through ``register_config``
like any plugin's section (docs/plugins.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SECTION = "knowledge"


class KnowledgeSettings(BaseModel):
    """``[knowledge]``: the index skills search through ``bot.services["knowledge"]``."""

    model_config = ConfigDict(extra="forbid")

    #: Default: ``<data_dir>/knowledge``.
    directory: Path | None = None
    #: A sentence-transformers model name or path; the default ships in a package (offline).
    model: str = "all-MiniLM-L6-v2"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    #: ``auto``: bfloat16 on CPUs that run it natively (2.2× faster here, same neighbours).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    chunk_tokens: int = Field(250, ge=16, le=8192)
    overlap: int = Field(32, ge=0)
    #: Collections this large (chunks) get an IVF index on the next rebuild or ingest.
    ivf_threshold: int = Field(20_000, ge=1)
    nprobe: int = Field(16, ge=1)
    #: Cosine similarity below which a passage counts as "nothing relevant".
    min_score: float = Field(0.3, ge=-1.0, le=1.0)
    #: Texts per encoder batch while ingesting. 16 took 9 % fewer CPU-seconds than 64 on
    #: 2,000 chunks of the Python docs, and the same on all 18,312 (docs/performance.md).
    batch_size: int = Field(64, ge=1)
    #: Larger files are skipped (and listed) rather than ingested.
    max_file_mb: float = Field(200, gt=0)
    #: Give each FAQ pair a second vector for its question alone: better matching of user
    #: questions (hit@3 0.86 → 0.97 on the FAQ corpus) for ~13 % more embedding time.
    faq_question_vectors: bool = True
    #: An ingest commits every this many chunks: a killed ingest keeps what it committed and
    #: the next one resumes by skipping those files (checksums).
    commit_chunks: int = Field(2048, ge=16)
    #: ``hybrid``: the vectors, plus BM25 on the code-like words of a question
    #: (``SESSION_COOKIE_SAMESITE``, ``--extra-files``, ``make_response()``), fused by rank;
    #: ``dense``: the vectors alone. Flask docs, identifier questions: recall@1 0.50 → 0.89.
    retrieval: Literal["hybrid", "dense"] = "hybrid"
    #: Weight of the keyword list in the fusion (the vectors' weight is 1).
    lexical_weight: float = Field(1.0, ge=0)
    #: Embed each chunk with its heading trail ("Configuration › Builtin values\n…"): Flask
    #: docs recall@1 0.79 → 0.88. Changing it needs ``chinwag knowledge rebuild --reembed``.
    embed_headings: bool = True
    #: Where the ingested folders are published, so citations link to the very section:
    #: ``{"/srv/docs/flask/_sources" = "https://flask.palletsprojects.com/en/2.2.x/"}``.
    links: dict[str, str] = Field(default_factory=dict)
    #: An operator's ``/correct`` of a reply to a question becomes a question/answer entry at
    #: once (``<directory>/taught/``), so the next user who asks gets the corrected answer,
    #: cited as taught by an operator (knowledge/taught.py). Off: corrections only train.
    teach_corrections: bool = True
