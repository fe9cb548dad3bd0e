"""The one place for unavoidable private torch / Lightning imports (version differences live here)."""
