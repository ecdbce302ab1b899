"""hipcall-ingest: Hipcall webhooks in, RabbitMQ quorum queues out, workers behind them."""

__version__ = "0.1.0"
