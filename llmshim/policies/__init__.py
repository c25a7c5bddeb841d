"""Policies: what llmshim does to a call. Each is a ``handle(call, next)`` / ``ahandle(call, anext)`` pair."""
