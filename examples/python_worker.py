#!/usr/bin/python3
"""A pg_baton worker in Python: nothing but psycopg 3 and the SQL protocol.

    examples/python_worker.py DSN QUEUE [--idle-exit SECONDS]

It LISTENs on baton_ready for wake-ups (polling every 2 s as a fallback),
claims steps of QUEUE, and runs each handler in a transaction that also calls
baton.complete_step: if the lease was lost (SQLSTATE BT001) the handler's own
writes roll back with it. Handlers are looked up by (workflow, step).
"""
import json
import select
import sys
import time

import psycopg

LEASE_LOST = "BT001"


def double(input, upstream, checkpoints):
    return {"value": input["n"] * 2}


HANDLERS = {("polyglot", "py_step"): double}


def run(dsn, queue, idle_exit=None, name="python-worker"):
    conn = psycopg.connect(dsn, autocommit=True)
    woken = []
    conn.add_notify_handler(lambda n: woken.append(n.payload) if n.payload == queue else None)
    conn.execute("LISTEN baton_ready")
    idle_since = time.monotonic()
    while True:
        # A claim in its own transaction need not wait for the WAL flush (a
        # claim lost in a crash is a lease that never was: README, "Claims
        # that skip the flush wait"); completions below stay durable.
        steps = conn.execute(
            "SELECT c.step_id, c.lease_token, c.workflow, c.step, c.input, c.upstream, c.checkpoints"
            "  FROM (SELECT set_config('synchronous_commit', 'off', true)) s,"
            "       baton.claim_steps(%s, ARRAY[%s], 10, '30 seconds') c",
            (name, queue),
        ).fetchall()
        for step_id, token, workflow, step, input, upstream, checkpoints in steps:
            handler = HANDLERS.get((workflow, step))
            try:
                with conn.transaction():
                    if handler is None:
                        raise RuntimeError(f"no handler for {workflow}.{step}")
                    output = handler(input, upstream, checkpoints)
                    conn.execute(
                        "SELECT baton.complete_step(%s, %s, %s::jsonb)", (step_id, token, json.dumps(output))
                    )
            except psycopg.Error as e:
                if e.sqlstate == LEASE_LOST:
                    print(f"{name}: lost the lease on step {step_id}; its work was rolled back", file=sys.stderr)
                    continue
                raise
            except Exception as e:  # the handler failed: let the database decide retry or fail
                try:
                    conn.execute("SELECT baton.fail_step(%s, %s, %s)", (step_id, token, str(e)))
                except psycopg.Error as fe:
                    if fe.sqlstate != LEASE_LOST:
                        raise
        if steps:
            idle_since = time.monotonic()
            continue
        if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
            return
        # Sleep until a notification arrives on the socket, or 2 s pass.
        select.select([conn.fileno()], [], [], 2.0)
        conn.execute("SELECT 1")  # lets psycopg read and dispatch notifications
        woken.clear()


if __name__ == "__main__":
    args = sys.argv[1:]
    idle = None
    if "--idle-exit" in args:
        i = args.index("--idle-exit")
        idle = float(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    run(args[0], args[1], idle)
