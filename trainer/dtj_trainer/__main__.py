import os
import sys

from .entrypoint import main

code = main()
# The worker is done (its result is stored and printed, it has left the job). Skip the
# interpreter's teardown: destroying gloo process groups with a receive still posted
# (a peer's last message, an abandoned generation) can abort the process with
# "terminate called without an active exception", turning a clean exit into SIGABRT.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
