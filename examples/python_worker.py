#!/usr/bin/python3
"""A pg_baton worker in Python: nothing but psycopg 3 and the SQL protocol.

    examples/python_worker.py DSN QUEUE [--threads N] [--idle-exit SECONDS]

The shape for a worker in any language (README, "Workers in other languages"):
- One connection per process LISTENs on baton_ready. PostgreSQL delivers a
  notification to every listener, so a listener per thread would wake every
  idle thread for each runnable step, and all but one would claim nothing.
- A notification wakes one idle claimer. Each of the N claimer threads has
  its own connection.
- A claimer loops on baton.complete_and_claim, which reports the steps it ran
  and claims the next batch in one round trip; the steps its completions make
  runnable are handed straight to it, so a chain stays on one thread. When a
  claim comes back empty the claimer goes idle again. A full batch wakes one
  more claimer: there may be more work than one thread takes.
- With no notification for POLL seconds the listener wakes a claimer anyway:
  notifications sent while it was disconnected are lost.

Handlers are looked up by (workflow, step) and return the step's output; an
exception fails the attempt (the database decides between retry and fail).
A map item (docs/time-and-events.md) is claimed under its map step's name,
with its position and element in the claim's map_index and map_item: the
handler gets them as `item` ((index, element), or None for other steps).
These handlers write nothing, so their completions go in batches. A handler
that writes to the database should instead make its writes and
baton.complete_step one transaction, so that a lost lease (SQLSTATE BT001)
rolls them back (psql_worker.sh does). A handler that may run longer than a
third of LEASE should call baton.heartbeat.

On SIGINT, SIGTERM or --idle-exit (no step claimed for that long) it runs and
reports the steps it holds, then exits, printing its counters to stderr.
"""
import select
import signal
import sys
import threading
import time

import psycopg
from psycopg.types.json import Jsonb

LEASE = "30 seconds"
BATCH = 10  # most steps per claim
POLL = 5.0  # seconds without a notification before a claim anyway
LEASE_LOST = "BT001"


def double(input, upstream, checkpoints, item):
    return {"value": input["n"] * 2}


def parts(input, upstream, checkpoints, item):
    return [input["n"], input["n"] + 1, input["n"] + 2]


def square(input, upstream, checkpoints, item):
    index, element = item
    return element * element


HANDLERS = {("polyglot", "py_step"): double, ("polyglot", "py_parts"): parts, ("polyglot", "py_square"): square}

COLUMNS = "step_id, lease_token, workflow, step, input, upstream, checkpoints, map_index, map_item"
# A claim with nothing to report need not wait for the WAL flush (README,
# "Claims that skip the flush wait"). A report carries completions, so it
# stays durable.
CLAIM = (
    f"SELECT {COLUMNS} FROM (SELECT set_config('synchronous_commit', 'off', true)) s,"
    " baton.claim_steps(%(worker)s, ARRAY[%(queue)s], %(max)s, %(lease)s)"
)
REPORT = (
    f"SELECT {COLUMNS} FROM baton.complete_and_claim(%(ids)s::bigint[], %(tokens)s::uuid[],"
    " %(outputs)s::jsonb[], %(worker)s, ARRAY[%(queue)s], %(max)s, %(lease)s)"
)

# Round trips that asked for steps, those that got none, and steps run: what
# the benchmark (examples/bench.rs, W1_py and W2_py) checks.
STATS = {"claims": 0, "empty": 0, "steps": 0}
STATS_LOCK = threading.Lock()


def count(asked, claimed, ran=0):
    with STATS_LOCK:
        STATS["claims"] += asked
        STATS["empty"] += asked and not claimed
        STATS["steps"] += ran


class Wakeups:
    """Wake-ups owed to idle claimers; each one lets exactly one claimer go."""

    def __init__(self, threads):
        self.cond = threading.Condition()
        self.threads = threads
        self.idle = 0
        self.pending = 0
        self.last_claimed = time.monotonic()
        self.stopping = False
        self.failed = False

    def wake_one(self):
        with self.cond:
            # More wake-ups than idle claimers would only buy empty claims. One
            # is kept even when none is idle: a claimer whose claim came back
            # empty just before this step became ready must still claim it.
            if self.pending < max(self.idle, 1):
                self.pending += 1
                self.cond.notify()

    def wait(self):
        """Blocks until this claimer may claim; False when the worker stops."""
        with self.cond:
            self.idle += 1
            while not self.pending and not self.stopping:
                self.cond.wait()
            self.idle -= 1
            if self.stopping:
                return False
            self.pending -= 1
            return True

    def claimed(self):
        with self.cond:
            self.last_claimed = time.monotonic()

    def idle_for(self):
        """How long since the last step was claimed, if every claimer is idle."""
        with self.cond:
            if self.idle < self.threads:
                return 0.0
            return time.monotonic() - self.last_claimed

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


def run_steps(conn, name, steps):
    """Runs the handlers; returns what to report. A failure is reported at once."""
    done = ([], [], [])
    for step_id, token, workflow, step, input, upstream, checkpoints, map_index, map_item in steps:
        try:
            handler = HANDLERS.get((workflow, step))
            if handler is None:
                raise LookupError(f"no handler for {workflow}.{step}")
            item = None if map_index is None else (map_index, map_item)
            output = handler(input, upstream, checkpoints, item)
        except Exception as e:
            try:
                conn.execute("SELECT baton.fail_step(%s, %s, %s)", (step_id, token, f"{type(e).__name__}: {e}"))
            except psycopg.Error as fe:
                if fe.sqlstate != LEASE_LOST:
                    raise
                print(f"{name}: lost the lease on step {step_id}", file=sys.stderr)
            continue
        for column, value in zip(done, (step_id, token, Jsonb(output))):
            column.append(value)
    return done


def claimer(dsn, queue, name, wakeups):
    try:
        conn = psycopg.connect(dsn, autocommit=True)
        # complete_and_claim skips a completion whose lease was lost, with a NOTICE
        conn.add_notice_handler(lambda d: print(f"{name}: {d.message_primary}", file=sys.stderr))
        args = {"worker": name, "queue": queue, "lease": LEASE, "max": BATCH}
        while wakeups.wait():
            steps = conn.execute(CLAIM, args).fetchall()
            count(1, len(steps))
            while steps:
                wakeups.claimed()
                if len(steps) == BATCH:
                    wakeups.wake_one()
                ids, tokens, outputs = run_steps(conn, name, steps)
                more = 0 if wakeups.stopping else BATCH
                report = {**args, "ids": ids, "tokens": tokens, "outputs": outputs, "max": more}
                steps = conn.execute(REPORT, report).fetchall()
                count(more > 0, len(steps), len(ids))
        conn.close()
    except BaseException:
        # A claimer that fails stops the process rather than leaving it with
        # fewer threads: let a supervisor restart it. Its leases expire and
        # are taken over.
        wakeups.failed = True
        wakeups.stop()
        raise


def listen(dsn, queue, wakeups, idle_exit, names):
    """The process's one LISTEN connection, reconnecting when it fails. It is
    also the session the database watches: the claimers' names are registered
    on it (baton.register_worker), so that when this process dies its leases
    go back within about a second instead of when they expire."""
    woken = time.monotonic()

    def wake():
        nonlocal woken
        woken = time.monotonic()
        wakeups.wake_one()

    while not wakeups.stopping:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.add_notify_handler(lambda n: wake() if n.payload == queue else None)
                conn.execute("LISTEN baton_ready")
                for worker in names:
                    conn.execute("SELECT baton.register_worker(%s, ARRAY[%s])", (worker, queue))
                wake()  # for what became runnable while nobody listened
                while not wakeups.stopping:
                    # Short waits, so that a stop or --idle-exit is seen soon.
                    if select.select([conn], [], [], 0.5)[0]:
                        conn.execute("SELECT 1")  # psycopg reads what arrived and calls wake()
                    if time.monotonic() - woken >= POLL:
                        wake()
                    if idle_exit is not None and wakeups.idle_for() > idle_exit:
                        wakeups.stop()
        except psycopg.OperationalError as e:
            print(f"python-worker: listener: {e}; reconnecting", file=sys.stderr)
            time.sleep(1)


def run(dsn, queue, threads=4, idle_exit=None, name="python-worker"):
    wakeups = Wakeups(threads)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: wakeups.stop())
    names = [f"{name}-{i}" for i in range(threads)]
    pool = [threading.Thread(target=claimer, args=(dsn, queue, n, wakeups)) for n in names]
    for t in pool:
        t.start()
    try:
        listen(dsn, queue, wakeups, idle_exit, names)
    finally:
        wakeups.stop()
        for t in pool:
            t.join()
    print(f"{name}: threads={threads} steps={STATS['steps']} claims={STATS['claims']} empty_claims={STATS['empty']}",
          file=sys.stderr)
    if wakeups.failed:
        sys.exit(1)


def main(args):
    opts = {"--threads": 4, "--idle-exit": None}
    for opt in opts:
        if opt in args:
            i = args.index(opt)
            opts[opt] = float(args[i + 1])
            del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    run(args[0], args[1], threads=int(opts["--threads"]), idle_exit=opts["--idle-exit"])


if __name__ == "__main__":
    main(sys.argv[1:])
