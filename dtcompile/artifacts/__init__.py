"""Artifact folders: manifest schema, hashing and verification."""
