# Sourced by gpu_session.sh: whether a CUDA MPS control daemon runs on this machine.
# A warm machine keeps the daemon an earlier call started, and starting a second one fails. `pgrep -x` cannot find it:
# the kernel keeps 15 characters of a process name ("nvidia-cuda-mps"), so the full name never matches, and mps-on
# then quit the running daemon and left the call's runs time-sliced (ten runs at about 270 ms a step where 155 ms was
# expected; 2026-12-07, sixteenth session). The command line keeps the whole name.
mps_daemon_running() {
    pgrep -f '(^|/)nvidia-cuda-mps-control( |$)' >/dev/null 2>&1
}
