"""md5 objects, without loading OpenSSL where it does not pay.

hashlib's first import loads libcrypto: 3-5 ms of a pod's cold start. The interpreter's own `_md5`
extension imports in a fraction of a millisecond but hashes about 15% slower and, on Python 3.11,
holds the GIL while it hashes. So it takes only inputs too small for that to add up, hashed where no
other thread waits, and only while hashlib is not loaded anyway.
"""
from __future__ import annotations

import sys

OPENSSL_FROM_BYTES = 16 << 20  # ~0.3 ms more per MiB with _md5: past this, loading OpenSSL is cheaper


def md5(expected_bytes: int, threaded: bool = False):
    """A new md5 object (update, digest, hexdigest, copy) for about expected_bytes of input;
    threaded: updated while other threads of this process have work to do."""
    if expected_bytes < OPENSSL_FROM_BYTES and not threaded and "_hashlib" not in sys.modules:
        try:
            import _md5
        except ImportError:  # interpreters built without it (FIPS builds, for one)
            pass
        else:
            return _md5.md5()
    import hashlib

    return hashlib.md5()
