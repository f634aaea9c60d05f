from conftest import echo_roundtrip


def test_one_byte_echo(echod):
    daemon = echod()
    with daemon.connect() as sock:
        assert echo_roundtrip(sock, b"x") == b"x"
