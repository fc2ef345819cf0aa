"""Helpers the test modules share. Test modules import from here (or use conftest fixtures), never from one
another (tests/test_layout.py)."""
