#!/usr/bin/env python3
"""CPU-time sampling profiler for clipal (how the profiles in bench/RESULTS.md were taken).

Wall-clock samplers (py-spy, pyinstrument) mislead on this 2-core machine:
clipal, the load generator and the upstream share the cores, so a sample
often lands where clipal was merely preempted (typically right after a
syscall such as gevent's getsockopt/send). This wrapper runs clipal with a
SIGPROF timer (ITIMER_PROF counts the process's own CPU time), so every
sample is CPU that clipal actually spent, attributed to the Python stack of
the greenlet that was running.

    # run clipal under the sampler (arguments as for `python -m clipal`)
    CPUPROF_OUT=prof.txt python bench/cpuprof.py --config-dir DIR --port N --log-level error &
    kill -USR1 <pid>    # start a window: forget earlier samples
    ... apply load ...
    kill -USR2 <pid>    # write collapsed stacks ("frame;frame;... count") to CPUPROF_OUT
    python bench/cpuprof.py --summary prof.txt    # share of CPU per layer

The kernel delivers SIGPROF at its tick rate (typically every 4 ms of CPU),
so take a few seconds of load for a few hundred samples.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sys

LAYERS = [  # (substring of the innermost frame, layer), first match wins; clipal modules are named
    ("gevent/pywsgi", "gevent.pywsgi (HTTP server)"),
    ("gevent/", "gevent (sockets, syscalls, hub, timers)"),
    ("urllib3/", "urllib3"),
    ("requests/", "requests (adapter, Response)"),
    ("http/client", "http.client"),
    ("werkzeug/", "werkzeug (routing, Response)"),
    ("flask/", "flask"),
    ("email/", "email (header objects)"),
    ("socket.py", "socket.py (makefile I/O)"),
    ("logging", "logging"),
]


def _layer(frame: str) -> str:
    match = re.search(r"clipal/(\w+)\.py", frame)
    if match:
        return "clipal." + match.group(1)
    for needle, name in LAYERS:
        if needle in frame:
            return name
    return "other stdlib / builtins"


def summary(path: str) -> None:
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            total += int(count)
            layers[_layer(stack.split(";")[-1])] += int(count)
    print(f"{total} samples (CPU time, innermost frame's layer)")
    for name, count in layers.most_common():
        print(f"{100 * count / total:5.1f}%  {name}")


def _frames(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        where = re.sub(r".*(site-packages|python3\.\d+)/", "", code.co_filename)
        names.append(f"{code.co_qualname} ({where}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


def run_clipal(argv: list[str]) -> int:
    samples: collections.Counter[str] = collections.Counter()
    out = os.environ.get("CPUPROF_OUT", "cpuprof.txt")

    def dump(*_):
        with open(out, "w") as f:
            for stack, count in samples.items():
                f.write(f"{stack} {count}\n")

    signal.signal(signal.SIGPROF, lambda _sig, frame: samples.update((_frames(frame),)))
    signal.signal(signal.SIGUSR1, lambda *_: samples.clear())
    signal.signal(signal.SIGUSR2, dump)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    from clipal.cli import main  # patches the standard library with gevent first

    try:
        return main(argv)
    finally:  # a SIGPROF after the handlers are gone would kill the exiting process
        signal.setitimer(signal.ITIMER_PROF, 0, 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2])
    else:
        sys.exit(run_clipal(sys.argv[1:]))
