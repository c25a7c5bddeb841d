"""Stores: WHERE llmshim keeps things. ``sqlite`` (embedded default); ``keys`` makes cache keys."""
