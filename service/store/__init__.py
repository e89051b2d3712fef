"""The prefix store of compressed caches: content addressing (ids), Redis storage, gRPC server and client."""
