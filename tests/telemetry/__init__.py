"""Tests of meshware.telemetry."""
