"""Untrusted media are decoded in a child process under hard OS limits.

A decoder bug, or a bomb that slips past the checks, can at worst kill its child: the
media replica that asked sees a dead or silent child, answers that file's request with a
4xx naming the budget it broke, and starts a fresh child for the next file. Browsers and
Android decode untrusted media the same way, in sandboxed processes.

The child (``python -m pipeline.media.sandbox``) is started once and reused:
- it imports the decoders, then caps its own address space at what it holds plus
  ``memory_bytes`` (``RLIMIT_AS``), so a decode can never take more than that;
- before each file it sets ``RLIMIT_CPU`` to the CPU it has used plus the file's CPU
  budget (the kernel kills it with SIGXCPU past it); the parent kills it past the wall
  budget;
- it may not write a file (``RLIMIT_FSIZE`` 0: uploads stay in memory) nor open more than a
  few descriptors, and runs its allocator with few arenas and its libraries with one thread
  (so the address-space cap measures the decode, not thread reservations).

Parent and child talk over pipes in a frame the parent parses without trusting it: a
length-prefixed JSON header (types and sizes checked) and raw bytes. Never pickle: a child
taken over by a decoder exploit must not be able to run code in the replica.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, cast

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload, Problem, Unavailable
from pipeline.core.records import CleanImage
from pipeline.media.video import CleanVideo

_LEN = struct.Struct(">II")  # header bytes, payload bytes
MAX_HEADER_BYTES = 64 * 1024
_PROBLEMS: tuple[str, ...] = ("malformed", "too_large", "unsupported_media", "invalid")
_CHILD_ENV = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True, slots=True)
class DecodeBudget:
    """What decoding one file may cost (service.yaml, ``decode_*``)."""

    memory_bytes: int  # address space the decode may add to the child's
    cpu_s: float
    wall_s: float


@dataclass(frozen=True, slots=True)
class DecodeReport:
    """A file's verdict and what decoding it cost, as the child measured it."""

    media: CleanImage | CleanVideo | None
    error: InvalidUpload | None
    cpu_s: float
    peak_extra_bytes: int  # peak resident memory above the child's resting size


class Decoder(Protocol):
    """Decodes, strips and re-encodes one file within ``cpu_s`` (a sandbox, or in process)."""

    def __call__(self, data: bytes, *, index: int, declared: str | None,
                 cpu_s: float | None = None, wall_s: float | None = None) -> DecodeReport: ...


# ---------------------------------------------------------------------------------------
# Framing (both sides)


def _send(stream, header: dict, payload: bytes = b"") -> None:
    raw = json.dumps(header, allow_nan=False).encode()
    stream.write(_LEN.pack(len(raw), len(payload)) + raw)
    stream.write(payload)
    stream.flush()


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number this protocol carries")


def _read_exact(fd: int, size: int, deadline: float | None) -> bytearray:
    """``size`` bytes from ``fd`` into one buffer (no second copy), by ``deadline``."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    poller = select.poll()  # not select(): any fd number
    poller.register(fd, select.POLLIN)
    done = 0
    while done < size:
        if deadline is not None:
            wait_ms = (deadline - time.monotonic()) * 1000
            if wait_ms <= 0 or not poller.poll(wait_ms):
                raise TimeoutError
        got = os.readv(fd, [view[done:done + (1 << 20)]])
        if not got:
            raise EOFError
        done += got
    return buffer


def _receive(fd: int, *, max_payload: int, deadline: float | None
             ) -> tuple[dict, bytearray]:
    header_len, payload_len = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    if header_len > MAX_HEADER_BYTES or payload_len > max_payload:
        raise ValueError("frame too large")
    header = json.loads(_read_exact(fd, header_len, deadline), parse_constant=_no_constant)
    if not isinstance(header, dict):
        raise ValueError("bad header")
    return header, _read_exact(fd, payload_len, deadline)


# ---------------------------------------------------------------------------------------
# The parent: one reused child


class SandboxedDecoder:
    """One child process decoding one file at a time. Thread-safe (calls are serialised);
    use several for parallel decodes (``SandboxPool``)."""

    def __init__(self, limits: ServiceConfig, budget: DecodeBudget) -> None:
        self.budget = budget
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.restarts = 0  # children replaced after dying or overrunning (for metrics)
        self._limits_json = limits.model_dump(mode="json")  # sent with every file
        self._max_answer_bytes = max(limits.max_file_bytes, limits.max_video_bytes) * 4 + (64 << 20)

    def _start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME",
                                                              "LANG", "LC_ALL")}
        env.update(_CHILD_ENV)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "pipeline.media.sandbox", str(self.budget.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, close_fds=True, start_new_session=True)
        except OSError:
            raise Unavailable("the media decoder could not start; try again shortly") from None
        try:
            assert child.stdout is not None
            header, _ = _receive(child.stdout.fileno(), max_payload=0,
                                 deadline=time.monotonic() + 120)
            if header.get("ready") is not True:
                raise ValueError("not ready")
        except (Exception, TimeoutError):
            _kill(child)
            raise Unavailable("the media decoder could not start; try again shortly") from None
        return child

    def start(self) -> None:
        """Start the child now (else at the first decode)."""
        with self._lock:
            self._live_child()

    def _live_child(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            self._child = self._start()
        return self._child

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._child is not None:
            _kill(self._child)
            self._child = None

    def decode(self, data: bytes, *, index: int, declared: str | None,
               cpu_s: float | None = None, wall_s: float | None = None) -> DecodeReport:
        """Decode, strip and re-encode one file in the child, within the budget (or the
        tighter ``cpu_s`` and ``wall_s`` its request has left). Never raises for what the
        file does: a refusal, a dead child or an overrun comes back as ``error``. Raises
        Unavailable only when no child can be started (the service's fault, a 503)."""
        budget_cpu_s = self.budget.cpu_s if cpu_s is None else min(cpu_s, self.budget.cpu_s)
        budget_wall_s = self.budget.wall_s if wall_s is None else min(wall_s, self.budget.wall_s)
        where = f"file {index}"
        cpu_overrun = _overrun(where, f"needs more than the decoding CPU budget of "
                               f"{budget_cpu_s:g} s")
        with self._lock:
            child = self._live_child()
            assert child.stdin is not None and child.stdout is not None
            # The wall budget holds for the write too: a child that stops reading (taken
            # over by an earlier file) is killed at the deadline, which unblocks the write.
            timer = threading.Timer(budget_wall_s, child.kill)
            timer.start()
            started = time.monotonic()
            try:
                _send(child.stdin, {"index": index, "declared": declared,
                                    "cpu_s": budget_cpu_s, "limits": self._limits_json}, data)
                header, payload = _receive(child.stdout.fileno(),
                                           max_payload=self._max_answer_bytes,
                                           deadline=started + budget_wall_s)
                report = _report(header, payload, where)
            except Exception:  # died, overran, or answered out of protocol: replaced
                overran = time.monotonic() - started >= budget_wall_s
                code = _kill(child)
                self._replace()
                if overran:
                    return _overrun(where, f"took longer than the decoding time budget of "
                                    f"{budget_wall_s:g} s")
                if code == -signal.SIGXCPU:
                    return cpu_overrun
                return _overrun(where, "could not be decoded within the memory budget of "
                                f"{self.budget.memory_bytes >> 20} MiB (or its decoder failed)")
            finally:
                timer.cancel()
            if report.error is None and report.cpu_s > budget_cpu_s:
                return cpu_overrun  # RLIMIT_CPU counts whole seconds; the child's count is exact
            return report

    def _replace(self) -> None:
        self._stop()
        self.restarts += 1


def _kill(child: subprocess.Popen) -> int | None:
    """Kill and reap a child (no zombie, no open pipes); its exit code."""
    try:
        child.kill()
    except OSError:  # already gone
        pass
    try:
        code = child.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): leave it
        code = None
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    return code


def _overrun(where: str, what: str) -> DecodeReport:
    return DecodeReport(None, InvalidUpload(f"{where} {what}; send a smaller or simpler "
                                            "file", problem="too_large"), 0.0, 0)


def _report(header: dict, payload: bytes | bytearray, where: str) -> DecodeReport:
    """The child's answer, checked field by field; ValueError for anything else (the
    parent then treats the child as broken and replaces it)."""
    try:
        return _parse_report(header, bytes(payload), where)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"{where}: the decoder's answer is malformed") from None


def _parse_report(header: dict, payload: bytes, where: str) -> DecodeReport:
    cpu_s = float(header.get("cpu_s", 0.0))
    peak = int(header.get("peak_extra_bytes", 0))
    if not (0 <= cpu_s < 1e6 and 0 <= peak < 1 << 50):
        raise ValueError("cost out of range")
    if header.get("ok") is not True:
        problem = header.get("problem")
        message = header.get("message")
        if problem not in _PROBLEMS or not isinstance(message, str) or len(message) > 500:
            raise ValueError("bad refusal")
        typed: Problem = problem  # type: ignore[assignment]
        return DecodeReport(None, InvalidUpload(message, problem=typed), cpu_s, peak)
    width, height = int(header["width_px"]), int(header["height_px"])
    source = str(header["source_format"])[:16]
    if header.get("kind") == "image":
        return DecodeReport(CleanImage(png_bytes=payload, width_px=width, height_px=height,
                                       source_format=source), None, cpu_s, peak)
    if header.get("kind") == "video":
        num, den = (int(x) for x in header["fps"])
        return DecodeReport(CleanVideo(mp4_bytes=payload, width_px=width, height_px=height,
                                       fps=Fraction(num, den),
                                       num_frames=int(header["num_frames"]),
                                       source_format=source), None, cpu_s, peak)
    raise ValueError(f"{where}: unknown media kind")


class SandboxPool:
    """``size`` children, each decoding one file at a time; ``decode`` blocks until one is
    free. Thread-safe."""

    def __init__(self, limits: ServiceConfig, budget: DecodeBudget, size: int) -> None:
        self.decoders = [SandboxedDecoder(limits, budget) for _ in range(size)]
        self._free = list(self.decoders)
        self._cond = threading.Condition()

    def decode(self, data: bytes, *, index: int, declared: str | None,
               cpu_s: float | None = None, wall_s: float | None = None) -> DecodeReport:
        deadline = time.monotonic() + (wall_s if wall_s is not None else 1e9)
        with self._cond:  # the wait for a free child counts against the request's time
            while not self._free and self._cond.wait(timeout=deadline - time.monotonic()):
                pass
            if not self._free or deadline <= time.monotonic():  # no child is killed for it
                return _overrun(f"file {index}", "waited past the request's decoding time "
                                "budget for a free decoder")
            decoder = self._free.pop()
        try:
            return decoder.decode(data, index=index, declared=declared, cpu_s=cpu_s,
                                  wall_s=None if wall_s is None else deadline - time.monotonic())
        finally:
            with self._cond:
                self._free.append(decoder)
                self._cond.notify()

    def start(self) -> None:
        """Start every child now, not at the first upload."""
        for decoder in self.decoders:
            decoder.start()

    @property
    def restarts(self) -> int:
        return sum(d.restarts for d in self.decoders)

    def close(self) -> None:
        for decoder in self.decoders:
            decoder.close()


# ---------------------------------------------------------------------------------------
# The child


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(memory_bytes: int) -> None:
    from pipeline.media.ingest import check_media  # the decoders, imported before the cap

    out = sys.stdout.buffer
    fd_in = sys.stdin.buffer.fileno()
    resting_kib = _status_kib("VmSize")
    hard = resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_AS, (resting_kib * 1024 + memory_bytes, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file is ever written
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _send(out, {"ready": True})
    while True:
        try:
            request, data = _receive(fd_in, max_payload=4 << 30, deadline=None)
        except EOFError:
            return
        limits = ServiceConfig.model_validate(request["limits"])
        _reset_peak()
        rest_kib = _status_kib("VmRSS")
        cpu0 = _cpu_s()
        resource.setrlimit(resource.RLIMIT_CPU,
                           (math.ceil(cpu0 + float(request["cpu_s"])), hard))
        try:
            # The upload's one copy in this process (bytes-like): no second copy of it
            # inside the memory budget.
            media = check_media(cast(bytes, data), index=int(request["index"]),
                                limits=limits, declared=request.get("declared"))
            answer: dict = {"ok": True}
            if isinstance(media, CleanImage):
                payload = media.png_bytes
                answer.update(kind="image", width_px=media.width_px,
                              height_px=media.height_px, source_format=media.source_format)
            else:
                payload = media.mp4_bytes
                answer.update(kind="video", width_px=media.width_px,
                              height_px=media.height_px, source_format=media.source_format,
                              fps=[media.fps.numerator, media.fps.denominator],
                              num_frames=media.num_frames)
        except InvalidUpload as exc:
            payload = b""
            answer = {"ok": False, "problem": exc.problem, "message": str(exc)[:500]}
        except MemoryError:
            payload = b""
            answer = {"ok": False, "problem": "too_large",
                      "message": f"file {request['index']} could not be decoded within the "
                                 f"memory budget of {memory_bytes >> 20} MiB; send a smaller "
                                 "or simpler file"}
        del data
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))  # replying costs no file's budget
        answer["cpu_s"] = _cpu_s() - cpu0
        answer["peak_extra_bytes"] = max(0, _status_kib("VmHWM") - rest_kib) * 1024
        _send(out, answer, payload)


if __name__ == "__main__":
    _child(int(sys.argv[1]))
