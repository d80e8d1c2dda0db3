"""Tests of dtcompile.models."""
