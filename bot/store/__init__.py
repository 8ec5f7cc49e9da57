"""The conversation store (see :mod:`bot.store.store`)."""

from bot.store.rows import (
    Conversation,
    FeedbackRow,
    ForgetResult,
    StoredMessage,
    StoreError,
)
from bot.store.store import ConversationStore

__all__ = [
    "Conversation",
    "ConversationStore",
    "FeedbackRow",
    "ForgetResult",
    "StoreError",
    "StoredMessage",
]
