"""KVCompose Serve: prefill long documents once, compress their KV caches, serve them to decoders."""

__version__ = "0.1.0"
