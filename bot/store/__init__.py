"""The conversation store (see :mod:`bot.store.store`)."""

from bot.store.store import (
    Conversation,
    ConversationStore,
    FeedbackRow,
    ForgetResult,
    StoredMessage,
    StoreError,
)

__all__ = [
    "Conversation",
    "ConversationStore",
    "FeedbackRow",
    "ForgetResult",
    "StoreError",
    "StoredMessage",
]
