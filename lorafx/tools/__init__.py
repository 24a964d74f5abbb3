"""User-facing tools: the `lorafx` command line, the demo, the cost model, diagnose, and
combine_adapters."""
