"""Operators' tools: what `hipcall-ingest status`, `tail`, `dlq` and `unrouted` do, as functions.

The CLI (ingest/cli.py) parses arguments and prints; the work is here, so that another front end (the
console) calls the same functions and the same at-least-once rules hold. These modules use the core
(config, topology, broker, message format) and nothing from `workers`.
"""
