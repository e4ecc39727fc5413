"""llmconsole services: ingestion, proxy worker, inference worker, simulator engine and their contracts."""
