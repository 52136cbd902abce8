import pytest

from pctop.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("64K", 65536), ("64k", 65536), ("256M", 256 << 20), ("1G", 1 << 30),
    ("1GiB", 1 << 30), ("2gb", 2 << 30), ("1.5K", 1536), (" 0 ", 0),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1M", "1X", "1.3", "12 MB extra", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (512, 65536, 256 << 20, 1 << 30, 1536)] == ["512", "64K", "256M", "1G", "1.5K"]
