"""A long-lived ClientApp worker, so a SuperNode keeps its base model loaded across rounds.

With its default `--isolation subprocess`, a flwr 1.42 SuperNode starts a new
`flwr-clientapp` process for every message, and `flwr-clientapp` exits after
that one message: the ClientApp would import torch and load the base model
again every round. Started with `--isolation process`, the SuperNode only
queues ClientApp tasks on its Runtime API for an outside process to run. This
worker is that process: it acquires the tasks one at a time and runs each in
this same Python process, through the same Runtime API calls `flwr-clientapp`
makes, so `fedcoder.model`'s resident model survives from round to round.

One worker per SuperNode, on the same machine. It runs the fedcoder ClientApp
installed in its own environment (already imported here), so it only accepts
runs of that same fedcoder version and answers any other app with an error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

import httpx
from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedcoder import __version__

APP_ID = "fedcoder/fedcoder"


def serve(
    runtime_api_address: str,
    *,
    insecure: bool,
    root_certificates: Path | None = None,
    parent_pid: int | None = None,
    poll_s: float = 0.5,
) -> None:
    """Run the SuperNode's ClientApp tasks in this process until interrupted.

    `parent_pid`: exit when that process (normally the SuperNode) is gone, as
    Flower's own task processes do.
    """
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    # The worker polls its SuperNode twice a second; httpx logs every request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Flower's logger prints through its own handler; passed on to the root
    # handler of the `fedcoder` command as well, every line would print twice.
    logging.getLogger("flwr").propagate = False
    # Import torch, transformers and the app now, while the federation starts,
    # rather than inside the first round.
    import fedcoder.client_app
    import fedcoder.training  # noqa: F401

    # This process runs every message of its SuperNode: the ClientApp may load the
    # base model as soon as the server's first query comes, ahead of training.
    os.environ[fedcoder.client_app.RESIDENT_WORKER_ENV] = "1"

    certificates = validate_and_resolve_root_certificates(
        str(root_certificates) if root_certificates else None, insecure
    )
    tasks = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log(INFO, "fedcoder ClientApp worker serving the SuperNode at %s", runtime_api_address)
    try:
        while True:
            acquired = tasks.AcquireTask(request)
            if acquired.HasField("task") and acquired.token:
                _run_task(runtime_api_address, acquired.token, insecure, certificates)
            else:
                time.sleep(poll_s)
    finally:
        tasks.close()


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None) -> None:
    """Run one ClientApp task, as `flwr-clientapp` does, without exiting afterwards."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        # No retries: Flower's retry policy interrupts the whole process when the
        # SuperNode rejects a task token, which suits a single-use flwr-clientapp
        # but would end this worker. A failed call fails this task only.
        retry_invoker=None,
    )
    heartbeat = HeartbeatSender(_task_heartbeat(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        if (run.fab_id, run.fab_version) != (APP_ID, __version__):
            raise RuntimeError(
                f"this worker runs {APP_ID} {__version__}, the run ships "
                f"{run.fab_id} {run.fab_version}"
            )
        # The app's modules are already imported in this process; the FAB is only
        # installed to resolve its ClientApp reference (pyproject's `clientapp`).
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # any failure becomes the task's error reply, as in flwr-clientapp
        log(ERROR, "ClientApp task failed", exc_info=ex)
        details = f"{type(ex).__name__}: {ex}"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, status, details)
        except Exception as ex:  # the worker must outlive one lost reply
            log(ERROR, "Could not report the task's result to the SuperNode", exc_info=ex)
        heartbeat.stop()
        client.close()


def _task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its SIGINT when the task is gone.

    `flwr-clientapp` interrupts itself when the SuperNode no longer knows its
    task (single-use process); a resident worker must instead finish the call
    and move on to the next task.
    """
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(request).success:
                log(WARNING, "The SuperNode no longer tracks this task")
        except httpx.TransportError:
            return False  # HeartbeatSender retries with backoff
        except httpx.HTTPStatusError as err:
            log(WARNING, "Task heartbeat refused: %s", err)
        return True

    return beat
