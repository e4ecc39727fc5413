"""Tests of llmconsole."""
