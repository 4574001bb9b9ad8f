"""Generated protobuf and gRPC code for referral.v1 (make generate; never edit by hand)."""
