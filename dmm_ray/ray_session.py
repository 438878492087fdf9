"""Joining or starting Ray the same way in every entry point.

`address` (a config key or `--address`), else `$RAY_ADDRESS` (set by `ray job submit`, or
`RAY_ADDRESS=auto` to join a `ray start --head` on this machine), else a *private* local Ray.
Never the bare `ray.init()`: it would join whatever `/tmp/ray/ray_current_cluster` names, and a
stale file left by a stopped cluster makes it wait for that cluster's GCS forever. `auto` with such
a file is an error naming it; `serve run` (Ray's CLI calls the bare `ray.init()`) gets a local Ray.
A plain `host:port` where nothing answers is an error naming it too (Ray would retry its GCS for minutes).
"""

from __future__ import annotations

import os

# One machine, no spot nodes: Ray Train's preemption watcher (one more actor per stage, and an error
# line about its constructor arguments on the console) has nothing to watch. Set on a private Ray here,
# and on the test cluster by tests/conftest.py (Ray Train passes the driver's setting to its controller).
NO_PREEMPTION_WATCHER = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Initialise Ray unless it already is; returns True when this call started it. Already initialised
    but connected to another cluster than a host:port `address` (or `$RAY_ADDRESS`) names: an error."""
    import ray

    if ray.is_initialized():
        check_connected(address or os.environ.get("RAY_ADDRESS"))
        return False
    address = check_address(address)
    if address and address != "local":  # "local": a new local Ray, i.e. the private one below
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # Logical headroom over the cores: Train workers, Ray Data tasks and actors share them.
        # No dashboard on a private Ray (it would take a core's worth of CPU on a small machine), so no
        # State API either: Ray Train's placement-group cleaner then warns every second that it cannot
        # query its controller (hundreds of identical lines per merge). Its cleanup still happens when
        # the run ends; the setup hook mutes only that logger in Ray's worker processes.
        # Ray Train patches `print` in its workers to log through the root logger, and prints too when
        # Ray has wrapped stdout (it always has): every worker line twice. Plain print: once.
        env = {"DMM_VERBOSE": "1"} if os.environ.get("DMM_VERBOSE") else {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        env.update(NO_PREEMPTION_WATCHER)
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=log_to_driver,
            runtime_env={"worker_process_setup_hook": "dmm_ray.ray_session.quiet_worker_logs", "env_vars": env},
        )
    from dmm_ray.console import sigterm_as_interrupt

    sigterm_as_interrupt()  # after ray.init, which installs Ray's own handler; a job's driver only
    return True


def check_address(address: str | None = None) -> str | None:
    """The address `ensure_ray` joins (`address`, else `$RAY_ADDRESS`), refused at once where Ray would
    wait: `auto` with a stale address file, or a plain host:port where nothing answers (Ray retries its
    GCS for minutes). `ray://...` and a hostname alone are left to Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "auto" and (stale := stale_recorded_cluster()):
        raise ConnectionError(f"address 'auto': {stale_message(stale)}; run `ray stop` (it clears the file) or start the cluster again")
    if address and address not in ("local", "auto") and not answers(address):
        raise ConnectionError(
            f"address {address!r} (--address, scaling.ray_address or $RAY_ADDRESS): no Ray cluster answers there; "
            "give the head node's host:port (`ray start --head` prints it; the GCS port is 6379 by default), "
            "`auto` for a `ray start --head` on this machine, or no address for a private local Ray"
        )
    return address


def check_connected(address: str | None) -> None:
    """This process's Ray is already initialised: refuse to go on when `address` is a plain host:port and
    that Ray's GCS is another one (another port, or another machine); `auto`, `local`, `ray://...` and
    no address accept the Ray there is."""
    import socket

    import ray

    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    connected = ray.get_runtime_context().gcs_address
    here = {ray.util.get_node_ip_address()}

    def machine(h: str) -> str:
        try:
            ip = socket.gethostbyname(h.strip("[]"))
        except OSError:
            return h
        return "this machine" if ip.startswith("127.") or ip in here else ip

    other_host, _, other_port = connected.rpartition(":")
    if (port, machine(host)) != (other_port, machine(other_host)):
        raise ConnectionError(
            f"address {address!r} (--address, scaling.ray_address or $RAY_ADDRESS): this process is already "
            f"connected to the Ray cluster at {connected}; call ray.shutdown() first, or give that address"
        )


def stale_recorded_cluster(address_file: str | None = None, timeout_s: float = 2.0) -> str | None:
    """The address in Ray's `ray_current_cluster` file (written by `ray start`, removed by `ray stop`)
    when nothing listens there: a cluster that stopped without `ray stop`. A bare `ray.init()`, and so
    `serve run`, would wait for that cluster's GCS forever. None when there is no file, the file does not
    hold host:port, or the address answers."""
    if address_file is None:
        from ray._common.utils import get_ray_address_file

        address_file = get_ray_address_file(None)
    try:
        recorded = open(address_file).read().strip()
    except OSError:
        return None
    return None if answers(recorded, timeout_s) else recorded


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """False when `address` is host:port and nothing accepts a connection there within `timeout_s`;
    True when something does, or when it is not a plain host:port (`ray://...`, a hostname alone:
    left to Ray)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def stale_message(recorded: str) -> str:
    from ray._common.utils import get_ray_address_file

    return f"Ray's address file {get_ray_address_file(None)} names {recorded}, where no Ray cluster answers (one that stopped without `ray stop`)"


def avoid_stale_cluster() -> None:
    """For `serve run`, which calls the bare `ray.init()` after importing the app: with no RAY_ADDRESS and
    a stale address file, start a local Ray (RAY_ADDRESS=local, what Ray reads at init) and say so, rather
    than wait forever. A running Ray, RAY_ADDRESS or a live recorded cluster: nothing changes."""
    import logging

    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or not (stale := stale_recorded_cluster()):
        return
    os.environ["RAY_ADDRESS"] = "local"
    logging.getLogger("dmm_ray").warning("%s; starting a local Ray instead (`ray stop` clears the file)", stale_message(stale))


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PLACEMENT_GROUP_CALLBACK_LOGGER = "ray.train.v2._internal.callbacks.placement_group_callback"


class _ToMutedLog:
    """A logging filter: records whose message starts with `prefix` go, traceback included, to
    dmm-muted.log instead of the console; every other record passes."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        _write_muted(record.name, record.getMessage(), record.exc_info)
        return False


def quiet_worker_logs() -> None:
    """Worker-process setup hook of a private Ray: errors only from the placement-group cleaner; its
    monitor thread's death on a slow GCS (an uncaught RpcError in Ray Train: the thread ends, the run
    goes on) and the controller's "Failed to stop PlacementGroupCleaner gracefully" traceback at the end
    of a run (its stop call timed out; the run has finished) written to `dmm-muted.log` in Ray's session
    log folder instead of the console."""
    import logging
    import threading

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    callback_logger = logging.getLogger(PLACEMENT_GROUP_CALLBACK_LOGGER)
    if not any(isinstance(f, _ToMutedLog) for f in callback_logger.filters):
        callback_logger.addFilter(_ToMutedLog("Failed to stop PlacementGroupCleaner gracefully"))
    default_hook = threading.excepthook

    def hook(args) -> None:
        if args.thread is None or args.thread.name != "PlacementGroupCleanerMonitor":
            return default_hook(args)
        _write_muted(args.thread.name, "", (args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = hook


def _write_muted(source: str, message: str, exc_info=None) -> None:
    """`[source, pid] message` and the traceback of `exc_info` (type, value, traceback), appended to dmm-muted.log."""
    import traceback

    with open(_muted_log(), "a") as log:
        log.write(f"[{source}, pid {os.getpid()}] {message}".rstrip() + "\n")
        if exc_info:
            traceback.print_exception(*exc_info, file=log)


def _muted_log() -> str:
    import tempfile

    try:
        import ray._private.worker

        return os.path.join(ray._private.worker.global_worker.node.get_logs_dir_path(), "dmm-muted.log")
    except Exception:  # not in a Ray worker (tests call the hook directly)
        return os.path.join(tempfile.gettempdir(), "dmm-muted.log")


def init_for_training(address: str | None = None) -> bool:
    """`ensure_ray` for a training job (merge, few-step): the training loop shows one progress bar
    per stage; Ray Data's per-operator bars would drown it. Returns True when this call started Ray."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False  # the plan of every Dataset execution: in Ray's ray-data.log, not the console
    return ensure_ray(address)


def train_run_options() -> dict:
    """RunConfig options of every TorchTrainer: Ray Train's own INFO lines (each checkpoint and report,
    the worker group) stay in its log files (the ray-train-sys-* files keep every level); the console
    shows WARNING and above, unless DMM_VERBOSE=1 (a job's --verbose)."""
    import inspect

    import ray.train

    if "logging_config" not in inspect.signature(ray.train.RunConfig).parameters:  # before Train V2: its default (INFO)
        return {}
    return {"logging_config": ray.train.LoggingConfig(log_level="INFO" if os.environ.get("DMM_VERBOSE") else "WARNING")}
