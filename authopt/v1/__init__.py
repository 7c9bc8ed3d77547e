"""Generated protobuf and gRPC code for the authopt.v1 API."""
