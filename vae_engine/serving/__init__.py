"""`vae-engine serve`: the micro-batcher, the /v1 JSON API, the Open Inference Protocol (KServe v2, REST and
gRPC), the page, and Ray Serve."""
