"""What a person reads: metric tables (Rich, Markdown) and plots (PNG)."""
