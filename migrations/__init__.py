"""peewee-migrate scripts, reviewed like code; installed as the package referral_grpc.migrations."""
