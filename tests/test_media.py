"""media.py: the mp4 writer is deterministic (the same video gives the same bytes in any process, under load), so
every result downstream of a written clip (the demo's dataset, its teacher, its table) repeats exactly."""
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITE = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
import media
torch.manual_seed(0)
v = torch.nn.functional.avg_pool3d(torch.rand(1, 3, 33, 64, 96) * 2 - 1, 3, 1, 1)[0]   # smooth, hard to encode
print(hashlib.md5(open(media.write_mp4(sys.argv[1], v), "rb").read()).hexdigest())
"""


def test_mp4_bytes_repeat_across_concurrent_processes(tmp_path):
    # before the fix (PyAV's own RGB->YUV pass inside encode, x264 threads) 6 concurrent writers gave 3 distinct files
    code = WRITE.format(root=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{i}.mp4")], stdout=subprocess.PIPE, text=True)
             for i in range(6)]
    digests = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(digests) == 1, digests
    assert hashlib.md5((tmp_path / "0.mp4").read_bytes()).hexdigest() in digests
