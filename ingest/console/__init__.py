"""The operators' console: pages and a JSON API over the same dead-letter, unrouted and status functions
as the CLI (ingest/ops), behind logins (passwords.py, auth.py). docs/console.md describes it."""
