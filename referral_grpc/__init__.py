"""Referral service: a gRPC server over Peewee models."""
