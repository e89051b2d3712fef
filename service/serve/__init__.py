"""The Ray Serve application: Ingress (gRPC via Serve's proxy) -> Compressor and Decoder deployments."""
