"""Pictures and pages for runs (matplotlib, no network assets)."""
