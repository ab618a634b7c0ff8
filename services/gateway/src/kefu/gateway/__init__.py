"""kefu gateway: the public HTTP, SSE, WebSocket and gRPC API; talks to the other services only over NATS."""
