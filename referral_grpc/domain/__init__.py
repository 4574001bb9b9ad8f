"""Business rules of the referral service; imports nothing from grpc or protobuf."""
