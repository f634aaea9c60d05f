"""Smoke test: the real `echod run` echoes one byte."""

import pytest
from conftest import echo_roundtrip

pytestmark = pytest.mark.integration


def test_one_byte_echo(echod):
    daemon = echod()
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"x") == b"x"
