"""Users' rights requests and usage data."""
