"""hyperdeq orchestration: Prefect flows and the command line (top of the import chain)."""
