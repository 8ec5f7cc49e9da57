"""Adapters connect the core to chat platforms; each turns platform events into
:class:`bot.messages.Message` and delivers :class:`bot.messages.Reply` back."""
