"""A display for headless Qt (the napari widget tests, tools/make_screenshots.py): Xvfb on a free
display number, exported as $DISPLAY. A watchdog shell stops the server once the calling process has
exited (after Qt let go of the display), also when the process is killed."""
import os
import shutil
import subprocess


def start_xvfb(screen: str) -> str | None:
    """Starts Xvfb with `screen` (e.g. "1600x1000x24") unless a display exists; returns why not if it
    cannot, else None."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        return "no display and no Xvfb: run under xvfb-run -a, or apt-get install xvfb"
    read_fd, write_fd = os.pipe()
    watchdog = ('Xvfb "$@" & x=$!; while kill -0 %d 2>/dev/null && kill -0 $x 2>/dev/null; do sleep 0.2; done; '
                'kill $x 2>/dev/null; wait $x' % os.getpid())
    subprocess.Popen(["sh", "-c", watchdog, "sh", "-displayfd", str(write_fd), "-screen", "0", screen,
                      "-nolisten", "tcp"], pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        display = pipe.readline().strip()
    if not display:
        return "Xvfb did not start"
    os.environ["DISPLAY"] = f":{display}"
    return None
