"""Formats: pure encoders and parsers over bytes and files (no network; torch only where a check needs it)."""
