"""What the HTTP ingress and a decoder replica say to each other, as plain typed values.

Domain errors cross the process boundary as a `Failure` (status, code, message) made
in the replica by `failure_of`, the one mapping from errors to HTTP, so the ingress
never depends on exception classes surviving transport. Every reply carries the
replica's `ReplicaStats`, which is how the ingress's /metrics sees every replica's tree
cache. `routing_key` is the multiplexing id that sends a document to the replica that
already holds it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from ctxtree.store import Corrupt, FingerprintMismatch, NotFound, StoreError, UnknownDocument
from ctxtree.kernels.generate import SamplingConfig

ROUTING_KEY_PREFIX = "doc-"
log = logging.getLogger("ctxtree.serve")


class RequestTooLarge(StoreError):
    """More documents, question tokens or answer tokens than this replica accepts."""


class Overloaded(RuntimeError):
    """The decoder's bounded queue is full (Serve's back pressure)."""


@dataclass(frozen=True)
class Failure:
    status: int
    code: str
    message: str


def failure_of(e: Exception) -> Failure:
    """The one mapping from domain errors to HTTP status, stable code and the message a
    client sees. Messages name the document and the kind of problem, never where an
    object lives (a server path, a bucket) or what an unexpected error said: that detail
    goes to this process's log."""
    from ctxtree.serve.tree_cache import TooLarge

    detail = str(e) or type(e).__name__
    about = f"document {e.doc_id!r}: " if isinstance(e, StoreError) and e.doc_id is not None else ""
    if isinstance(e, UnknownDocument):
        status, code, message = 404, "document_not_found", detail
    elif isinstance(e, NotFound):
        status, code = 404, "document_not_found"
        message = f"{about}an object of its stored trees is missing from the store"
    elif isinstance(e, FingerprintMismatch):
        status, code, message = 409, "fingerprint_mismatch", detail
    elif isinstance(e, (RequestTooLarge, TooLarge)):
        status, code, message = 413, "request_too_large", detail
    elif isinstance(e, Overloaded):
        status, code, message = 503, "overloaded", "the decoder queue is full, retry later"
    elif isinstance(e, Corrupt):
        status, code = 500, "corrupt_tree_object"
        message = f"{about}its stored trees are corrupt or do not match their manifest; recompress it"
    elif isinstance(e, StoreError):
        status, code, message = 500, "store_error", f"{about}the tree store failed to answer"
    elif isinstance(e, ValueError):
        status, code, message = 422, "invalid_request", detail
    else:
        status, code, message = 500, "internal_error", "internal error (the server log has the details)"
    if message != detail:
        # an overload is routine under load (the client retries): not a warning per request
        log.log(logging.DEBUG if status == 503 else logging.WARNING, "%s %s: %s", status, code, detail,
                exc_info=e if code == "internal_error" else None)
    return Failure(status, code, message)


@dataclass(frozen=True)
class AnswerRequest:
    documents: list[str]
    question: str
    sampling: SamplingConfig
    seed: int = 0
    policy: str = "query"
    stop: tuple[str, ...] = ()   # the answer ends before the first of these


@dataclass
class ReplicaStats:
    """A replica's tree-cache counters at the moment of a reply (cumulative, except
    load_ms: the load times recorded since its previous reply, each sent once)."""
    replica: str
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_errors: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    load_ms: list[float] = field(default_factory=list)


def routing_key(doc_id: str) -> str:
    """The multiplexed model id for a document: a sha256 of its id, so keys are the same
    in every process (never Python's seeded hash()) and document ids stay out of Serve's
    own logs and metric labels."""
    return ROUTING_KEY_PREFIX + hashlib.sha256(doc_id.encode()).hexdigest()[:24]
