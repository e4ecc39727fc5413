"""The page textual-serve sends for ``llmconsole --web``: no external URLs (fonts from the wheel)."""
