"""executor.md5: the interpreter's own md5 for small inputs hashed alone, OpenSSL's otherwise;
the same digests either way."""
import hashlib
import os
import subprocess
import sys

import pytest

from executor.md5 import OPENSSL_FROM_BYTES, md5

PICK = """
import sys
from executor.md5 import md5
h = md5(int(sys.argv[1]), threaded=sys.argv[2] == "1")
h.update(b"abc")
print(type(h).__module__ or "", type(h).__name__, "_hashlib" in sys.modules, h.hexdigest())
"""


def _pick(expected_bytes: int, threaded: bool, preload: str = "") -> list[str]:
    out = subprocess.run([sys.executable, "-c", preload + PICK, str(expected_bytes), "1" if threaded else "0"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == hashlib.md5(b"abc").hexdigest()
    return out


def test_small_input_hashed_alone_does_not_load_openssl():
    assert _pick(1 << 20, threaded=False)[-2] == "False"


@pytest.mark.parametrize("expected_bytes, threaded", [(OPENSSL_FROM_BYTES, False), (1 << 20, True)])
def test_large_or_threaded_input_gets_openssl(expected_bytes, threaded):
    # _md5 would hold the GIL while it hashes, and is slower on large inputs
    assert _pick(expected_bytes, threaded)[-2] == "True"


def test_once_hashlib_is_loaded_it_is_used():
    out = _pick(1 << 20, threaded=False, preload="import hashlib\n")
    assert out[-2] == "True" and out[0] != "_md5"


@pytest.mark.parametrize("expected_bytes, threaded", [(0, False), (OPENSSL_FROM_BYTES, False), (0, True)])
def test_same_digest_as_hashlib_piece_by_piece(expected_bytes, threaded):
    data = os.urandom(3 << 20)
    hasher = md5(expected_bytes, threaded)
    for i in range(0, len(data), 100_000):
        hasher.update(memoryview(data)[i:i + 100_000])
    assert hasher.hexdigest() == hashlib.md5(data).hexdigest()


def test_without_the_interpreters_md5_it_falls_back_to_hashlib():
    # builds without _md5 (some FIPS builds): importing it fails, hashlib serves every size
    out = _pick(1 << 20, threaded=False, preload="import sys\nsys.modules['_md5'] = None\n")
    assert out[-2] == "True" and out[0] == "_hashlib"
