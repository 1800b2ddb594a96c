"""The wire: NATS and its subject table, message checks, protobuf codec, KV transfer, the
tokenizer's gRPC client."""
