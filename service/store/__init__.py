"""The prefix store of compressed caches (issue #3): content addressing today; Redis and gRPC next."""
