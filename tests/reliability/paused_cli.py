"""Run the rlsubnet CLI with a pause in the middle of writing, so a test can signal or kill it there.

    python paused_cli.py READY_FILE rlsubnet-args...

After the first block of output is written (a patch record, or a part of a rebuilt tensor), the run creates
READY_FILE and sleeps: its temporaries are on disk and its output lock is held. With RLSUBNET_TEST_THREADED=1
patch create and apply run their threaded pipelines (reader, decoder and writer threads) whatever the size, and
the pause comes in the main thread while those threads hold blocks in flight.
"""

import os
import signal
import sys
import time
from pathlib import Path

import rlsubnet.patch.apply as apply_module
import rlsubnet.patch.encode as encode_module
from rlsubnet.checkpoint.writer import SafetensorsWriter
from rlsubnet.cli.main import main
from rlsubnet.patch.format import PatchWriter

ready = Path(sys.argv[1])
# Started from a background shell, SIGINT and SIGTERM may arrive ignored: take them as an interactive run would.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pause_after(owner, name):
    original = getattr(owner, name)

    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        if not ready.exists():
            ready.write_text("writing\n")
            time.sleep(300)  # the test signals or kills the process long before this ends
        return result

    setattr(owner, name, paused)


pause_after(PatchWriter, "add_record")
if os.environ.get("RLSUBNET_TEST_THREADED") == "1":
    apply_module.THREADS_FROM_BYTES = encode_module.THREADS_FROM_BYTES = 0
    pause_after(apply_module, "apply_changes")  # main thread; the writer thread has the shard file open
else:
    pause_after(SafetensorsWriter, "write_part")
sys.exit(main(sys.argv[2:]))
