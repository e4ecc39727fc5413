"""llmconsole: the operator console (Textual) for the inference stack."""
