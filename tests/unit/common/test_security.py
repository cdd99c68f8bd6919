"""Where a service may listen without TLS, and with security off."""

import pytest

from llmos.common.security import InsecureBind, Security, is_loopback


def test_loopback_addresses():
    assert all(is_loopback(a) for a in ("127.0.0.1:50051", "127.3.4.5:0", "localhost:1", "[::1]:2"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:50051", "10.0.0.5:1", "[::]:2", "example.com:3"))


def test_binding_beyond_loopback_needs_tls_and_security_on(tmp_path):
    with pytest.raises(InsecureBind, match="without TLS"):
        Security("gateway").bind(object(), "0.0.0.0:50051", public=True)
    with pytest.raises(InsecureBind, match="security off"):
        Security("gateway", tls_dir=str(tmp_path), insecure=True).bind(object(), "0.0.0.0:50051", public=True)
