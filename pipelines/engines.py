"""Execution engines behind the stage flags: ``--runner dask`` and a Dask runner that keeps every record."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import os
import pickle
import socket
import sys
import threading
import typing as t
from urllib.parse import urlsplit

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.common import Receiver
from apache_beam.runners.runner import PipelineResult, PipelineState

from schemas.errors import StageFailed, UserError

log = logging.getLogger("mmcorpus")

# Beam's own class path; `--runner dask` and this path both run on ``DaskRunner`` below.
BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DASK_RUNNER = "pipelines.engines.DaskRunner"
_DASK_NAMES = {"dask", "daskrunner", BEAM_DASK_RUNNER.lower(), DASK_RUNNER.lower()}

# Our short flags -> Beam's DaskOptions flags (or ours below).
_ALIASES = {
    "--dask-address": "--dask_client_address",
    "--dask_address": "--dask_client_address",
    "--dask-workers": "--dask_local_workers",
    "--dask-timeout": "--dask_connection_timeout",
}
_SCHEDULER_CHECK_TIMEOUT_S = 10.0
# Input records per Dask partition at most (the runner's second bound beside bytes / target). Measured on
# the dedup stage (bench.scale, caption-only records with 2% images, workers of 4 GiB): 40,000 records
# per partition peaked at 1.4 GiB of worker RSS, 83,000 passed 3.8 GiB and the nanny restarted the worker.
DEFAULT_PARTITION_RECORDS = 20_000
# A one-stage shuffle is P x P bucket tasks: 2,500 at P = 50 (1M records), 10^8 at 200M. Above this many
# partitions a shuffle goes through several hops of at most this many branches (dask.dataframe's task
# shuffle uses the same default): two up to 1,024 partitions, three up to 32,768.
DEFAULT_MAX_BRANCH = 32
# Above this many tasks a stage's graph gets a warning before it is submitted: the driver holds about
# 850 bytes per task (bench.engine_graph: dedup at P = 2,200 is 4.1M tasks and 3.2 GiB of driver memory)
# and dask's scheduler, one thread, handles every task.
TASKS_WARNING = 2_000_000


class LocalDaskOptions(PipelineOptions):
    """The one Dask flag Beam lacks: the size of a local cluster started for a single run."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dask_local_workers", type=int, default=None,
            help="without --dask_client_address: start a local Dask cluster of this many worker "
            "processes (1 thread each) for this run and stop it afterwards (default: CPU count)",
        )
        parser.add_argument(
            "--dask_min_partitions", type=int, default=None,
            help="at least this many partitions per shuffle (set by the stage runner to the input's bytes / "
            "--target-shard-bytes, so a partition holds about one shard); --dask_npartitions overrides it",
        )
        parser.add_argument(
            "--dask_max_branch", type=int, default=DEFAULT_MAX_BRANCH,
            help="a shuffle of more partitions than this runs in h hops of at most this many branches "
            "each (h = ceil(log P / log max_branch); about h x P x P^(1/h) tasks instead of P x P), as "
            "dask.dataframe's max_branch (default %(default)s)",
        )
        parser.add_argument(
            "--dask_partition_records", type=int, default=DEFAULT_PARTITION_RECORDS,
            help="at most about this many input records per partition (default %(default)s): a stage's "
            "per-record state (dedup's signatures, band keys and joins) outgrows the input's bytes when "
            "records are small, so the stage runner also sets --dask_min_partitions to records / this",
        )


def _split_flags(args: list[str]) -> list[tuple[str, str | None]]:
    """``["--a=1", "--b", "2", "--c"]`` -> ``[("--a", "1"), ("--b", "2"), ("--c", None)]``."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            out.append((name, value))
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((arg, args[i + 1]))
            i += 1
        else:
            out.append((arg, None))
        i += 1
    return out


def is_dask(runner: str | None) -> bool:
    return runner is not None and runner.strip().lower() in _DASK_NAMES


def translate(beam_args: list[str]) -> list[str]:
    """Rewrite the short Dask flags into Beam's and point every Dask runner name at ``DaskRunner``.

    ``--runner dask --dask-address tcp://H:8786`` becomes
    ``--runner=pipelines.engines.DaskRunner --dask_client_address=tcp://H:8786``; Beam's own spelling
    (``--runner=apache_beam.runners.dask.dask_runner.DaskRunner``) is redirected too, because Beam's
    class silently loses records (see ``DaskRunner``). Other flags pass through untouched.

    Raises:
        UserError: Dask flags without ``--runner dask``, ``--dask-workers`` together with an address,
            or a scheduler address nothing answers on.
    """
    flags = _split_flags(list(beam_args))
    runner = next((v for k, v in flags if k == "--runner"), None)
    out: list[str] = []
    dask_flags = []
    for name, value in flags:
        if _ALIASES.get(name, name).startswith("--dask_"):
            dask_flags.append(name)
        name = _ALIASES.get(name, name)
        if name == "--runner" and is_dask(value):
            value = DASK_RUNNER
        out.append(name if value is None else f"{name}={value}")
    if not is_dask(runner):
        if dask_flags:
            raise UserError(
                f"{', '.join(sorted(set(dask_flags)))} only applies to the Dask engine: add --runner dask "
                f"(runner is {runner or 'DirectRunner, the default'})"
            )
        return out
    values = dict(flags)
    address = values.get("--dask-address") or values.get("--dask_address") or values.get("--dask_client_address")
    workers = values.get("--dask-workers") or values.get("--dask_local_workers")
    if address and workers:
        raise UserError(
            "--dask-workers starts a local cluster; with --dask-address the cluster's own workers run the "
            "stage: drop one of the two"
        )
    if workers is not None and (not workers.isdigit() or int(workers) < 1):
        raise UserError(f"--dask-workers must be a positive integer, got {workers!r}")
    if address:
        check_scheduler(address)
    return out


def check_scheduler(address: str, timeout_s: float = _SCHEDULER_CHECK_TIMEOUT_S) -> None:
    """Fail fast, with the fix in the message, when nothing listens at a scheduler address."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        raise UserError(f"--dask-address {address!r} is not a scheduler address like tcp://HOST:8786")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(
            f"no Dask scheduler answers at {address} ({type(e).__name__}: {e}); start one with "
            f"`dask scheduler --port {parts.port}` and workers with `dask worker {address}`, or fix --dask-address"
        ) from None


# --- the runner --------------------------------------------------------------------------------
#
# Beam 2.77's DaskRunner translates a pipeline into dask.bag operations, but (read in
# apache_beam/runners/dask/): (1) a ParDo's tagged outputs lose their tags, so every consumer of
# any output of a multi-output ParDo receives all of its outputs; (2) elements a DoFn emits in
# finish_bundle are dropped (BatchElements emits its last batch there); (3) only the last
# transform's bag is computed, so other leaves never run; (4) a side input is recomputed from
# scratch inside every task that reads it (upstream side effects repeat); (5) Reshuffle is a no-op,
# so everything read from one Create partition stays in one task. ``DaskRunner`` keeps Beam's
# overrides (which turn Create, GroupByKey, Flatten, Reshuffle and Read into marker transforms) and
# translates every transform itself (``_Translator``).


def _windowed(item: t.Any, _cache: list = []):  # noqa: B006 (a per-process cache, on purpose)
    # Called once per element and step. Building the window tuple and the timestamp each time was
    # 12 s of 33 s of worker CPU in dedup at 5k pairs (GlobalWindow() recomputes its end from a proto
    # in __init__): build them once per process.
    from apache_beam.utils.windowed_value import WindowedValue

    if isinstance(item, WindowedValue):
        return item
    if not _cache:
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import Timestamp

        _cache.extend((Timestamp(0), (GlobalWindow(),)))
    return WindowedValue(item, _cache[0], _cache[1])


class _Collect(Receiver):
    """A Receiver that keeps main outputs as values and tagged outputs as ``TaggedOutput``."""

    def __init__(self, tag: str | None, out: list):
        self.tag = tag
        self.out = out

    def receive(self, windowed_value) -> None:
        v = windowed_value.value
        self.out.append(v if self.tag is None else beam.pvalue.TaggedOutput(self.tag, v))

    def receive_batch(self, windowed_batch) -> None:  # only for batched DoFns, which no stage uses
        for wv in windowed_batch.as_windowed_values(iter):
            self.receive(wv)


class _Receivers(dict):
    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        r = self[tag] = _Collect(tag, self.out)
        return r


@dataclasses.dataclass
class _ParDoSpec:
    fn: t.Any
    label: str
    args: list
    kwargs: dict
    side_views: list  # (view class, view options, window mapping fn) per side input


def _dofn_steps(items: t.Iterable, spec_bytes: bytes, side_values: tuple) -> t.Iterator:
    """One DoFn over one partition (one bundle), as a generator: setup, start_bundle, process every
    element, finish_bundle (whose outputs are kept), teardown. Outputs are handed on element by element,
    so a chain of ParDos fused into one task never builds a list between its steps. The DoFn is
    unpickled here, fresh per partition: a DoFn set up in place (clients, threads, event loops) must
    never be shared by two partitions or be shipped to another worker."""
    import cloudpickle
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
    from apache_beam.transforms.sideinputs import SideInputMap

    spec: _ParDoSpec = cloudpickle.loads(spec_bytes)
    out: list = []
    receivers = _Receivers(out)
    handler = _OutputHandler(
        window_fn=None, main_receivers=receivers[None], tagged_receivers=receivers,
        per_element_output_counter=None, output_batch_converter=None,
        process_yields_batches=False, process_batch_yields_elements=False,
    )
    side_inputs = [
        SideInputMap(view, options, [_windowed(v) for v in values])
        for (view, options, _), values in zip(spec.side_views, side_values)
    ]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(spec.fn), handler, context=DoFnContext(spec.label, state=None),
        side_inputs=side_inputs, input_args=list(spec.args), input_kwargs=dict(spec.kwargs),
        user_state_context=None, bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(_windowed(item))
        if out:
            yield from out
            out.clear()
    invoker.invoke_finish_bundle()
    yield from out
    out.clear()
    invoker.invoke_teardown()


def _tag_steps(items: t.Iterable, tag) -> t.Iterator:
    """The elements of one output of a multi-output ParDo (main outputs are plain, tagged ones wrapped)."""
    if tag is None:
        return (v for v in items if not isinstance(v, beam.pvalue.TaggedOutput))
    return (v.value for v in items if isinstance(v, beam.pvalue.TaggedOutput) and v.tag == tag)


# Whether this process is a Dask worker of a stage run (set by ``_trim_memory``, which the driver
# runs on every worker before a stage): only there does ``_freeze`` freeze.
_FREEZE_RESULTS = False


def _freeze() -> None:
    """Move everything alive now out of the cyclic garbage collector's scans (``gc.freeze``), on a
    Dask worker during a stage run: called when a task starts (its inputs, perhaps just received from
    another worker) and when it ends (its result). A worker holds its materialised partitions and
    shuffle outputs (hundreds of thousands of records, several objects each) while it runs other
    tasks, and every full collection scanned them all again: in the pack stage at 100k pairs on one
    worker, 30 full collections took 6.2 s of its 22 s of CPU (the DirectRunner's whole process: 0.6 s;
    it holds encoded bytes between steps); frozen, 1.3 s of 16 s. The records hold no reference
    cycles, so reference counting still frees them when their last consumer lets go. Cyclic garbage
    not yet collected is frozen too (about 3,000-6,000 objects per worker per pack run);
    ``_trim_memory`` unfreezes and collects it before the next stage, so it lives one stage at most."""
    if _FREEZE_RESULTS:
        import gc

        gc.freeze()


def _held(part: list) -> list:
    _freeze()
    return part


def _steps(items: t.Iterable, chain: tuple) -> t.Iterator:
    """Run a fused chain of steps over one partition, lazily. ``chain`` holds ``("tag", tag)`` and
    ``("pardo", spec_bytes, side_values)`` steps; dask has already put the computed side inputs in."""
    _freeze()
    it = iter(items)
    for step in chain:
        it = _tag_steps(it, step[1]) if step[0] == "tag" else _dofn_steps(it, step[1], step[2])
    return it


class _Partition(list):
    """A task's list of elements. distributed sends a plain ``list`` result to another worker element
    by element (``to_serialize`` serialises a list, tuple or dict item by item: a pickle call, an
    ``inspect.getmodule`` probe, a header and a frame per element, and the same again to deserialise);
    a subclass is pickled whole, in one call. 70,000 ``Pair`` records (2% with 30 KB images): 1.74 s
    of CPU to serialise and deserialise item by item, 0.76 s whole. In the pack stage at 100k pairs
    (two workers) sending results was about a fifth of the workers' CPU (py-spy: ``Worker.get_data``)."""

    __slots__ = ()


def _materialize(items, chain) -> list:
    return _held(_Partition(_steps(items, chain)))


# The stage's dask graph is one plain dict of tasks ({key: Task}), built in O(tasks) and referenced by
# key (TaskRef), nested anywhere in a task's arguments. Not dask.delayed: a delayed call merges the
# HighLevelGraph layers of every upstream collection and culls the whole graph once per collection
# found inside a list argument, so building dedup's graph was quadratic in its size (at 13 partitions
# minutes of driver CPU before any task ran; at 50, over ten minutes and still building).


class _Graph:
    """Tasks of one stage run, keyed ``(name, index...)``."""

    def __init__(self):
        self.dsk: dict = {}

    def task(self, key, fn, *args):
        """Add ``key = fn(*args)``; args may hold ``ref(other key)`` inside tuples at any depth (dask puts
        the computed values in before calling). Returns ``key``."""
        from dask._task_spec import Task

        self.dsk[key] = Task(key, fn, *(_nested(a) for a in args))
        return key

    def data(self, key, value):
        from dask._task_spec import DataNode

        self.dsk[key] = DataNode(key, value)
        return key


def _nested(obj):
    """``obj`` with each tuple that holds a reference turned into dask's Tuple node (a task
    resolves only references it can see: at top level or inside such nodes)."""
    from dask._task_spec import GraphNode, TaskRef, Tuple

    if type(obj) is not tuple:
        return obj
    items = tuple(_nested(o) for o in obj)
    if any(isinstance(o, (TaskRef, GraphNode)) for o in items):
        return Tuple(*items)
    return obj


def ref(key):
    from dask._task_spec import TaskRef

    return TaskRef(key)


def _concat_parts(chains, *items) -> list:
    """Partitions ``items[i]`` with their chains ``chains[i]`` -> one list: the chains run one after the
    other, in order."""
    out = _Partition()
    for part, chain in zip(items, chains):
        out.extend(_steps(part, chain))
    return _held(out)


def _count_parts(chains, *items) -> int:
    n = 0
    for part, chain in zip(items, chains):
        for _ in _steps(part, chain):
            n += 1
    return n


def _sum(*counts) -> int:
    return sum(counts)


def _dumps(value) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # what plain pickle cannot take (a lambda inside an element): as dask would
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _pickled_split(split, *args) -> tuple:
    """``split(*args)``'s buckets, each as one pickled byte string. A bucket list's size is then exact
    for dask: its ``sizeof`` of a list samples 10 items and extrapolates, and with blocks of uneven
    size (dedup's edge blocks) it estimated one 1M-record split at 7.54 GiB and refused to run the task
    on a 4 GiB worker (bench.scale). A bucket crosses between workers as those bytes."""
    return tuple(_dumps(b) for b in split(*args))


# dask sizes every task result (its memory manager, and a task whose inputs it thinks exceed the
# worker's memory limit is refused with MemoryError). Its size of a list or tuple samples 10 random items
# and extrapolates: with the stages' uneven elements (dedup's edge and label blocks, a few large numpy
# blocks beside small ones) that was off by orders of magnitude, at random: bench.scale once stopped
# with "Task ('group-split:Dedup/Components/R0GroupNeighbours/GroupByKey', 27) has 12.19 GiB worth of
# input dependencies, but worker ... has memory_limit set to 4.00 GiB" on a 1M-record run whose
# previous run, same code and input, had passed.
# Items sized per list or tuple, by nesting depth: every item of a top-level result up to 256 (so a list
# of a few uneven blocks is exact), evenly spaced beyond; 16 in each of the next three levels, 4 deeper (lists of flat values are summed
# exactly instead, whatever their length or depth). Without the depth
# limit a 20,000-group merge output (key, [values]) took 88 ms to size, on every task: a quarter of a
# Dask worker's CPU in the 1M-record dedup (py-spy).
_SIZEOF_ITEMS = (256, 16, 16, 16, 4)
_sizeof_depth = threading.local()
# Items sized exactly at any length: one C-speed pass, no sampling (a shard's list of packed batches
# holds a few large ones among many small: four samples of it once made 5.48 GiB of ~0.2).
_FLAT_TYPES = frozenset((bytes, str, int, float, bool, type(None)))


def _sizeof_sequence(seq) -> int:
    """A list's or tuple's size for dask: exact when its items are all flat values (bytes, str,
    numbers); else the sum over its items up to ``_SIZEOF_ITEMS[depth]`` of them, and beyond that many
    evenly spaced items scaled up (deterministic; nested elements that many are records, alike in size)."""
    from dask.sizeof import sizeof

    n = len(seq)
    types = set(map(type, seq))
    if types <= _FLAT_TYPES:  # dask's own size of each, without its dispatch per item where it can
        if types == {bytes}:
            return sys.getsizeof(seq) + sum(map(len, seq))
        return sys.getsizeof(seq) + sum(map(sizeof, seq))
    depth = getattr(_sizeof_depth, "depth", 0)
    limit = _SIZEOF_ITEMS[min(depth, len(_SIZEOF_ITEMS) - 1)]
    _sizeof_depth.depth = depth + 1
    try:
        if n <= limit:
            return sys.getsizeof(seq) + sum(map(sizeof, seq))
        step = n / limit
        sample = sum(sizeof(seq[int(i * step)]) for i in range(limit))
        return sys.getsizeof(seq) + int(sample * n / limit)
    finally:
        _sizeof_depth.depth = depth


def _register_sizeof() -> None:
    """Install ``_sizeof_sequence`` in this process (the driver and, through the task functions of this
    module that every worker unpickles, each Dask worker)."""
    try:
        from dask.sizeof import sizeof
    except ImportError:  # no Dask extra installed: no engine to size for
        return
    sizeof.register(list)(_sizeof_sequence)
    sizeof.register(tuple)(_sizeof_sequence)


_register_sizeof()


def _apply_merge(merge, n_extra: int, *args):
    """``merge(buckets, *extra)`` of a shuffle's output partition, from positional arguments
    ``(*extra, *pieces)``: a piece is one pickled bucket, or (multi-hop shuffle) a tuple of them."""
    buckets = []
    for piece in args[n_extra:]:
        if type(piece) is tuple:
            buckets.extend(pickle.loads(b) for b in piece)
        else:
            buckets.append(pickle.loads(piece))
    return _held(_Partition(merge(buckets, *args[:n_extra])))


def _regroup(*slices: tuple) -> tuple:
    """One hop of a multi-hop shuffle: each of a range's holders gives its slice for one block of
    outputs (a tuple per output: one pickled bucket, or a tuple of them in input order); returns, per
    output of the block, the range's buckets for it in input order (still pickled: nothing is
    unpickled between the split and the merge)."""
    return tuple(tuple(b for entry in col for b in (entry if type(entry) is tuple else (entry,)))
                 for col in zip(*slices)) if slices else ()


def _root_up(n: int, hops: int) -> int:
    """The least k with k ** hops >= n (integers only, no float rounding)."""
    k = max(1, int(round(n ** (1 / hops))))
    while k ** hops < n:
        k += 1
    while k > 1 and (k - 1) ** hops >= n:
        k -= 1
    return k


def _hops(inputs: int, outputs: int, max_branch: int) -> int:
    """Hops of a shuffle of ``inputs`` splits into ``outputs`` partitions: 1 while its inputs x outputs
    bucket tasks are few (at most max_branch ** 2) or one side is 1 or 2 (a global combine, a read of
    one file: hops would move the data more often to save few tasks); else the least h >= 2 with
    max_branch ** h >= the larger side, as dask.dataframe's task shuffle. So 32 large input files
    read into P = 10,000 partitions take three hops (25,720 slice, regroup and piece tasks), not
    320,000 buckets."""
    if min(inputs, outputs) <= 2 or inputs * outputs <= max_branch ** 2:
        return 1
    h = 2
    while max_branch ** h < max(inputs, outputs):
        h += 1
    return h


def _sub_blocks(block: range, k: int) -> list[range]:
    """``block`` cut into min(k, len) neighbouring ranges whose sizes differ by at most one."""
    parts = min(k, len(block))
    q, extra = divmod(len(block), parts)
    out, a = [], block.start
    for i in range(parts):
        b = a + q + (i < extra)
        out.append(range(a, b))
        a = b
    return out


def _parts_task(graph: _Graph, fn, parts: list, key):
    """A task running ``fn(chains, *partitions)`` over partitions ``[(key, chain), ...]``."""
    return graph.task(key, fn, tuple(chain for _, chain in parts), *(ref(k) for k, _ in parts))


def _name(label: str, kind: str) -> str:
    """A task-key prefix naming the Beam transform (dask's task stream and dashboard group by it),
    unique per run so two runs on one cluster never share a key."""
    return f"{kind}:{label}:{_RUN_ID}"


_RUN_ID = os.urandom(4).hex()
_PLAIN = (str, bytes, int, float, bool, type(None))


def _bucket_of(key, n: int) -> int:
    """A process-independent bucket for a key (Python's ``hash`` is salted per process; workers are
    processes). crc32 of the key's bytes for strings, bytes, numbers and tuples of them (what the
    stages group by); dask's ``tokenize`` for anything else."""
    import zlib

    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        data = key
    elif isinstance(key, _PLAIN) or (isinstance(key, tuple) and all(isinstance(k, _PLAIN) for k in key)):
        data = repr(key).encode("utf-8", "surrogatepass")
    else:
        from dask.base import tokenize

        return int(tokenize(key), 16) % n
    return zlib.crc32(data) % n


def _split_by_key(items, chain, n: int) -> tuple:
    """Run one input partition's fused chain and hash-partition its ``(key, value)`` outputs into
    ``n`` buckets, unwrapping the ``WindowedValue`` Beam's ReifyWindows put around each value."""
    from apache_beam.utils.windowed_value import WindowedValue

    buckets: list[list] = [[] for _ in range(n)]
    for key, value in _steps(items, chain):
        buckets[_bucket_of(key, n)].append((key, value.value if isinstance(value, WindowedValue) else value))
    return tuple(buckets)


def _split_even(items, chain, n: int) -> tuple:
    """Run one input partition's fused chain and cut its outputs into ``n`` neighbouring runs."""
    values = list(_steps(items, chain))
    size = -(-len(values) // n) if values else 0
    return tuple(values[i * size:(i + 1) * size] for i in range(n))


def _combine_fn(fn_bytes: bytes):
    import cloudpickle

    fn = cloudpickle.loads(fn_bytes)
    if hasattr(fn, "setup"):
        fn.setup()
    return fn


def _split_combine(items, chain, n: int, fn_bytes: bytes) -> tuple:
    """A lifted CombinePerKey's first half: one accumulator per key of this partition, then hash-
    partitioned into ``n`` buckets, so the shuffle moves one accumulator per key, not every value."""
    from apache_beam.utils.windowed_value import WindowedValue

    fn = _combine_fn(fn_bytes)
    accs: dict = {}
    for key, value in _steps(items, chain):
        if isinstance(value, WindowedValue):
            value = value.value
        acc = accs.get(key)
        accs[key] = fn.add_input(fn.create_accumulator() if acc is None else acc, value)
    buckets: list[list] = [[] for _ in range(n)]
    for key, acc in accs.items():
        buckets[_bucket_of(key, n)].append((key, acc))
    return tuple(buckets)


def _merge_combine(buckets: list[list], fn_bytes: bytes) -> list:
    """A lifted CombinePerKey's second half: ``(key, output)`` per key, as CombineValues would emit."""
    fn = _combine_fn(fn_bytes)
    accs: dict = {}
    for bucket in buckets:
        for key, acc in bucket:
            accs.setdefault(key, []).append(acc)
    return [(key, fn.extract_output(fn.merge_accumulators(a))) for key, a in accs.items()]


def _merge_groups(buckets: list[list]) -> list:
    """One output partition of a GroupByKey: ``(key, [values])`` in first-seen order."""
    groups: dict = {}
    for bucket in buckets:
        for key, value in bucket:
            groups.setdefault(key, []).append(value)
    return list(groups.items())


def _chunks(parts: list, n: int) -> list[list]:
    """Split a list of partitions into at most ``n`` runs of neighbours (order kept)."""
    size = max(1, -(-len(parts) // n))
    return [parts[i:i + size] for i in range(0, len(parts), size)] or [[]]


class _Uses(beam.pipeline.PipelineVisitor):
    """How many times each leaf transform's outputs are read (as main or side input)."""

    def __init__(self):
        self.uses: dict = {}

    def visit_transform(self, node) -> None:
        for pc in list(node.main_inputs.values()) + [si.pvalue for si in node.side_inputs]:
            if not isinstance(pc, beam.pvalue.PBegin):
                self.uses[pc.producer] = self.uses.get(pc.producer, 0) + 1


def _windows_elements(transform) -> bool:
    """A WindowInto other than the global window: the engine runs every element in the global window
    (its GroupByKey groups by key alone and passes values through without their windows), so it refuses
    such a transform instead of grouping across windows."""
    from apache_beam.transforms.window import GlobalWindows

    return isinstance(transform, beam.WindowInto) and not isinstance(transform.windowing.windowfn, GlobalWindows)


class _Translator(beam.pipeline.PipelineVisitor):
    """Translate every leaf transform into dask tasks, fusing chains of ParDos.

    A PCollection is a list of partitions, each ``(key, chain)``: the key of a task in ``self.graph``
    whose result is a list,
    and the steps (ParDos, tag selections) still to run over it. A ParDo only appends its step to the
    chain, so a chain of ParDos runs as one task per partition, element by element, and no list between
    two steps is ever stored or shipped between workers. A chain becomes a task of its own (is
    materialised) where it must: where it is read more than once (a side effect must run once), at a
    shuffle (GroupByKey, Reshuffle), as a side input, and at the sinks.
    """

    def __init__(self, bag_kwargs: dict, partitions: int, uses: dict, max_branch: int = DEFAULT_MAX_BRANCH):
        from apache_beam.runners.dask.overrides import (
            _Create, _Flatten, _GroupAlsoByWindow, _GroupByKeyOnly, _Read, _Reshuffle,
        )

        self.bag_kwargs = bag_kwargs
        self.graph = _Graph()
        self._n_empty = 0
        self.partitions = partitions  # of every shuffle's output (GroupByKey, Reshuffle) and Flatten's cap
        self.max_branch = max(2, max_branch)  # the stage runner refuses < 2 with a UserError
        self.uses = uses
        self.pcolls: dict = {}
        self._lifted: set = set()  # CombinePerKey nodes whose combine runs around the shuffle
        self._kinds = {
            _Create: self._create, _Flatten: self._flatten, _GroupByKeyOnly: self._group,
            _GroupAlsoByWindow: self._identity, _Reshuffle: self._reshuffle, _Read: self._unsupported,
        }

    def _input(self, pcoll) -> list:
        """The partitions of one input PCollection: its producer's, narrowed to its tag when the producer
        is a multi-output ParDo."""
        producer = pcoll.producer
        parts = self.pcolls[producer]
        if isinstance(producer.transform, beam.ParDo) and len(producer.outputs) > 1:
            tag = next(k for k, v in producer.outputs.items() if v is pcoll)
            step = ("tag", None if tag in (None, "None") else tag)
            parts = [(task, chain + (step,)) for task, chain in parts]
        return parts

    def visit_transform(self, node) -> None:
        transform = node.transform
        kind = self._kinds.get(type(transform))
        if kind is None and isinstance(transform, beam.ParDo):
            kind = self._pardo
        if kind is None or _windows_elements(transform):
            self._unsupported(node)
        inputs = [self._input(pc) for pc in node.main_inputs.values() if not isinstance(pc, beam.pvalue.PBegin)]
        parts = kind(node, inputs)
        if self.uses.get(node, 0) > 1:  # read twice: run the chain once, in a task of its own
            parts = self._materialized(node.full_label, parts)
        self.pcolls[node] = parts

    def _materialized(self, label: str, parts: list) -> list:
        name = _name(label, "out")
        return [
            (key if not chain else self.graph.task((name, i), _materialize, ref(key), chain), ())
            for i, (key, chain) in enumerate(parts)
        ]

    def _empty(self):
        """A partition with no elements (a fresh key each time)."""
        self._n_empty += 1
        return self.graph.data((_name("empty", "data"), self._n_empty), _Partition())

    # one method per translated transform: (node, input partitions) -> partitions
    def _unsupported(self, node, inputs=None):
        raise NotImplementedError(
            f"the Dask engine cannot run {node.full_label!r} ({type(node.transform).__name__}): Beam's Dask "
            "runner translates only Create, ParDo, GroupByKey, Flatten and Reshuffle, in the global window; "
            "use the DirectRunner or Dataflow for this stage"
        )

    def _create(self, node, inputs):
        values = list(node.transform.values)
        npartitions = self.bag_kwargs.get("npartitions")
        size = self.bag_kwargs.get("partition_size")
        if not size:
            size = max(1, -(-len(values) // npartitions)) if npartitions else 128
        if not values:  # an empty Create still needs one (empty) partition to flow through
            return [(self._empty(), ())]
        name = _name(node.full_label, "create")
        return [(self.graph.data((name, i), _Partition(values[start:start + size])), ())
                for i, start in enumerate(range(0, len(values), size))]

    def _flatten(self, node, inputs):
        parts = [p for ps in inputs for p in ps]
        if not parts:
            return [(self._empty(), ())]
        if len(parts) <= self.partitions:  # nothing to run: the inputs' partitions side by side
            return parts
        # More partitions than a shuffle makes: merge neighbours so Flatten -> ParDo chains in loops
        # (CoGroupByKey's tagging, dedup's rounds) never multiply the task count.
        name = _name(node.full_label, "flatten")
        return [(_parts_task(self.graph, _concat_parts, chunk, (name, i)), ())
                for i, chunk in enumerate(_chunks(parts, self.partitions))]

    def _identity(self, node, inputs):
        return inputs[0]

    def _shuffle(self, node, parts: list, split, merge, kind: str, *extra, n: int | None = None) -> list:
        """All-to-all: every input partition's chain runs and splits into n buckets (P unless given; one
        task per input partition); output partition j merges bucket j of every split (one task per
        output), in split order. One stage: a task per bucket, inputs x n + inputs + n tasks, so P x P.
        Past max_branch ** 2 buckets (and more than 2 on each side), several hops (``_hops``,
        ``_multi_hop``)."""
        n = n or self.partitions
        g = self.graph
        split_name, bucket_name = _name(node.full_label, f"{kind}-split"), _name(node.full_label, f"{kind}-bucket")
        merge_name = _name(node.full_label, f"{kind}-merge")
        extra_refs = tuple(ref(k) for k in extra)
        splits = [g.task((split_name, i), _pickled_split, split, ref(key), chain, n, *extra_refs) for i, (key, chain) in enumerate(parts)]
        hops = _hops(len(splits), n, self.max_branch)
        if hops > 1:
            pieces = self._multi_hop(node.full_label, kind, splits, n, hops)
        else:
            # Bucket j of split i is a task of its own, run where the split is: only that bucket moves.
            for i, s in enumerate(splits):
                for j in range(n):
                    g.task((bucket_name, i, j), operator.getitem, ref(s), j)
            pieces = [tuple(ref((bucket_name, i, j)) for i in range(len(splits))) for j in range(n)]
        return [(g.task((merge_name, j), _apply_merge, merge, len(extra_refs), *extra_refs, *pieces[j]), ())
                for j in range(n)]

    def _multi_hop(self, label: str, kind: str, splits: list, n: int, hops: int) -> list[tuple]:
        """Route split i's bucket j to output j in ``hops`` hops, like dask.dataframe's task shuffle.
        A holder holds, for a range of splits, their buckets for a block of outputs. Before hop 1 each
        split is a holder of itself and every output. Each hop before the last joins k_in neighbouring
        ranges (k_in = least k with k ** hops >= splits) and cuts each block into k_out sub-blocks
        (likewise for n): one slice task per (old holder, sub-block), one regroup task per new holder,
        about P holders after each hop. The last hop: output j takes its piece from each of the at
        most k_in final ranges. About hops x P x (k + 1) tasks: at P = 10,000 and max_branch 32, three
        hops of k = 22 (about 7 x 10^5 tasks) instead of two of k = 100 (2 x 10^6) or one (10^8). The
        data crosses the network once per hop but is pickled once, and each output still receives the
        buckets in split order (same elements, same order: same bytes)."""
        g = self.graph
        k_in, k_out = _root_up(len(splits), hops), _root_up(n, hops)
        slice_name, regroup_name = _name(label, f"{kind}-slice"), _name(label, f"{kind}-regroup")
        piece_name = _name(label, f"{kind}-piece")
        # holders[r] = [(key, block), ...]: range r's holders, one per block (blocks are the same for
        # every range of a hop: they depend on the hop only).
        holders = [[(s, range(n))] for s in splits]
        for hop in range(1, hops):
            joined = []
            for r0 in range(0, len(holders), k_in):
                group = holders[r0:r0 + k_in]
                row = []
                for c, (_, block) in enumerate(group[0]):
                    for sub in _sub_blocks(block, k_out):
                        cut = slice(sub.start - block.start, sub.stop - block.start)
                        slices = [ref(g.task((slice_name, hop, r0 + x, sub.start), operator.getitem, ref(h[c][0]), cut))
                                  for x, h in enumerate(group)]
                        row.append((g.task((regroup_name, hop, r0 // k_in, sub.start), _regroup, *slices), sub))
                joined.append(row)
            holders = joined
        pieces: list[list] = [[] for _ in range(n)]
        for r, row in enumerate(holders):
            for key, block in row:
                for o, j in enumerate(block):
                    pieces[j].append(ref(g.task((piece_name, r, j), operator.getitem, ref(key), o)))
        return [tuple(p) for p in pieces]

    def _reshuffle(self, node, inputs):
        # Spread the elements over P partitions (neighbours kept together, order kept).
        return self._shuffle(node, inputs[0], _split_even, _concat, "reshuffle")

    def _group(self, node, inputs):
        # Our own all-to-all shuffle into exactly P partitions by a process-independent hash of the key.
        # dask.bag's groupby keeps the input's partition count, so Flatten -> GroupByKey chains
        # (CoGroupByKey, dedup's rounds) multiplied partitions into tens of thousands of tiny tasks; and
        # merging partitions with Bag.repartition before it gave wrong joins in dedup (dask 2026.8).
        combine = self._liftable(node)
        if combine is not None:
            # Combiner lifting (Beam's runners do it; its Dask runner does not): combine per key before
            # the shuffle and merge accumulators after it; the CombineValues ParDo then passes through.
            import cloudpickle

            self._lifted.add(combine)
            fn_bytes = self.graph.data((_name(node.full_label, "combine-fn"), 0), cloudpickle.dumps(combine.transform.fn))
            # A global combine (CombineGlobally: counts, ToList, ToDict, ...) has one key, so one output
            # partition holds everything whatever P is: its shuffle needs one bucket per input, not P.
            n = 1 if self._global(combine) else None
            return self._shuffle(node, inputs[0], _split_combine, _merge_combine, "combine", fn_bytes, n=n)
        return self._shuffle(node, inputs[0], _split_by_key, _merge_groups, "group")

    @staticmethod
    def _combine_of(node):
        """The CombinePerKey composite a leaf belongs to (its grandparent), or None."""
        parent = node.parent.parent if node.parent is not None else None
        if parent is not None and isinstance(parent.transform, beam.CombinePerKey):
            return parent
        return None

    @staticmethod
    def _global(combine) -> bool:
        """Whether a CombinePerKey composite is the one inside a CombineGlobally (its single key: None)."""
        parent = combine.parent
        return parent is not None and isinstance(parent.transform, beam.CombineGlobally)

    def _liftable(self, node):
        """The CombinePerKey whose GroupByKey ``node`` is, when its CombineFn takes no extra arguments."""
        combine = self._combine_of(node)
        if combine is None or not isinstance(combine.transform.fn, beam.CombineFn):
            return None
        if combine.transform.args or combine.transform.kwargs:
            return None
        return combine

    def _side_input(self, parts: list, label: str):
        # Each partition's chain runs in its own task (in parallel: a side input's chain may be the
        # stage's shard writes), then one small task puts the lists together.
        parts = self._materialized(label, parts)
        return ref(_parts_task(self.graph, _concat_parts, parts, (_name(label, "side"), 0)))

    def _pardo(self, node, inputs):
        import cloudpickle

        transform = node.transform
        if self._combine_of(node) in self._lifted and type(transform.fn).__name__ == "CombineValuesDoFn":
            return inputs[0]  # its lifted GroupByKey already emits (key, combined output)
        if type(transform.fn) is beam.GroupByKey.ReifyWindows:
            # Beam's GroupByKey wraps every value in a WindowedValue (its window and timestamp) for the
            # shuffle, through a DoFn invoker that rebuilds its arguments per element; the engine runs
            # the global window only and its shuffle unwrapped the values again, so the values go
            # through as they are (one DoFn invocation and one WindowedValue less per value shuffled;
            # pack at 100k pairs on one worker: about 2-3 s of 20 s of CPU, measured under load).
            return inputs[0]
        args, kwargs = transform.raw_side_inputs
        sides = list(node.side_inputs)
        spec = _ParDoSpec(
            fn=transform.fn, label=node.full_label, args=list(args), kwargs=dict(kwargs),
            side_views=[(type(si), si._view_options(), si._window_mapping_fn) for si in sides],
        )
        # Each side input is materialised once, in the same graph, and handed whole to every partition
        # that reads it (never recomputed per task, as Beam's runner does).
        side_items = tuple(self._side_input(self._input(si.pvalue), f"{node.full_label}/side{i}") for i, si in enumerate(sides))
        # The pickled DoFn is one graph value shared by every partition's task (not a copy per task).
        spec_bytes = ref(self.graph.data((_name(node.full_label, "spec"), 0), cloudpickle.dumps(spec)))
        # Plain tasks, not Bag.map_partitions: a bag that is both a main input and, through an Item
        # argument, a side input was computed twice (once per worker; dask 2026.8), and a DoFn's side
        # effects (requests, writes) must run once. dask puts the computed values into the step.
        step = ("pardo", spec_bytes, side_items)
        return [(task, chain + (step,)) for task, chain in inputs[0]]

    def sinks(self) -> list:
        """The partitions of every PCollection nothing reads."""
        return [parts for node, parts in self.pcolls.items() if self.uses.get(node, 0) == 0]


def _concat(lists) -> list:
    return list(itertools.chain.from_iterable(lists))



def _trim_memory() -> int:
    """Run on a worker: collect garbage (the last stage's frozen results too, see ``_held``) and hand
    glibc's free heap pages back to the OS (0 elsewhere); from now on this worker freezes its held
    task results."""
    import ctypes
    import gc

    global _FREEZE_RESULTS
    _FREEZE_RESULTS = True
    gc.unfreeze()
    gc.collect()
    try:
        return int(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return 0


def _trim_workers(client) -> None:
    """Before a stage runs, every worker returns the memory earlier runs freed. Workers outlive a
    stage, and freed Python objects leave the heap fragmented: in bench.scale the workers still held
    2.1-2.3 GiB of RSS after the 1M dedup had finished, which dask counts against the 4 GiB limit of the
    next stage (pack then passed 95% and a worker was restarted); ``malloc_trim`` gave back 0.65-0.9 GiB
    per worker."""
    try:
        client.run(_trim_memory)
    except Exception:  # best effort: a worker that cannot trim still runs the stage
        log.debug("trimming worker memory failed", exc_info=True)


@dataclasses.dataclass
class DaskRunResult(PipelineResult):
    """Waits for every sink, then closes the client and any local cluster it started."""

    client: t.Any
    futures: list
    cluster: t.Any = None

    def __post_init__(self):
        super().__init__(PipelineState.RUNNING)

    def wait_until_finish(self, duration=None) -> str:
        import dask.distributed as ddist

        try:
            for _ in ddist.as_completed(self.futures, timeout=None if duration is None else duration / 1000,
                                        with_results=True):
                pass
            self._state = PipelineState.DONE
        except ddist.KilledWorker as e:
            self._state = PipelineState.FAILED
            raise StageFailed(
                f"Dask engine: a task's workers died repeatedly ({e}); the stage did not finish and its "
                "output has no manifest. Check the workers' memory limit and logs, then rerun the stage"
            ) from e
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self.close()
        return self._state

    def close(self) -> None:
        for thing in (self.client, self.cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing must not hide the run's own outcome
                    log.debug("closing %r failed", thing, exc_info=True)
        self.client = self.cluster = None

    def cancel(self) -> str:
        if self.client is not None:
            self.client.cancel(self.futures)
        self.close()
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self):
        raise NotImplementedError("Beam's Dask runner does not collect metrics; counts are in the manifest")


def translate_pipeline(pipeline, options, threads: int) -> tuple["_Translator", t.Any]:
    """The Dask engine's task graph for ``pipeline``: (the translator, whose ``graph.dsk`` holds every
    task, and a ``Delayed`` of the total element count of every sink, which runs the whole stage).
    ``threads``: the cluster's worker threads (the least partition count). Needs no cluster: bench
    engine_graph measures the graph's size at corpus-scale partition counts with it."""
    from dask.delayed import Delayed
    from apache_beam.runners.dask.dask_runner import DaskOptions
    from apache_beam.runners.dask.overrides import dask_overrides

    dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
    bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
    pipeline.replace_all(dask_overrides())
    uses = _Uses()
    pipeline.visit(uses)
    # P: --dask_npartitions when given, else enough partitions that each holds about one target
    # shard of input (the runner's --dask_min_partitions), and never fewer than the threads.
    min_partitions = options.view_as(LocalDaskOptions).dask_min_partitions or 1
    partitions = bag_kwargs.get("npartitions") or max(threads, min_partitions)
    translator = _Translator(bag_kwargs, partitions=partitions, uses=uses.uses,
                             max_branch=options.view_as(LocalDaskOptions).dask_max_branch)
    pipeline.visit(translator)
    sinks = translator.sinks()
    # Every sink reduced to its element count (each partition's chain runs inside its count task),
    # all in ONE collection: computing several collections that share upstream tasks ran those
    # tasks once per collection (seen here: every DoFn twice), and side effects must run once.
    graph = translator.graph
    counts = [_parts_task(graph, _count_parts, [part], (_name("sink", "count"), i))
              for i, part in enumerate(p for parts in sinks for p in parts)]
    total = Delayed(graph.task((_name("sink", "total"), 0), _sum, *(ref(k) for k in counts)), graph.dsk)
    log.info("Dask engine: %d transforms, %d sinks, %d partitions per shuffle, %d tasks",
             len(translator.pcolls), len(sinks), translator.partitions, len(graph.dsk))
    if len(graph.dsk) > TASKS_WARNING:
        log.warning("Dask engine: %s tasks at %s partitions per shuffle: about %.1f GiB of driver memory for "
                    "the graph alone and as many tasks for dask's scheduler to run. Fewer, larger partitions "
                    "make far fewer tasks (about P^(4/3)): raise --dask_partition_records or "
                    "--target-shard-bytes (with worker memory), or set --dask_npartitions; for a corpus "
                    "this size, a runner with its own shuffle service (Dataflow, Flink, Spark) also works "
                    "(docs/operations.md)", f"{len(graph.dsk):,}", f"{translator.partitions:,}",
                    len(graph.dsk) * 850 / 2**30)
    return translator, total


def _dask_runner_base():
    from apache_beam.runners.dask.dask_runner import DaskRunner as BeamDaskRunner

    return BeamDaskRunner


class DaskRunner(_dask_runner_base()):
    """Beam's DaskRunner with a translation that keeps tagged outputs apart, keeps finish_bundle
    outputs, computes every sink, shares side inputs, and spreads Reshuffle over the workers.

    Connects to ``--dask_client_address`` or, without one, starts a local cluster of
    ``--dask_local_workers`` processes that lives only for this run.
    """

    def run_pipeline(self, pipeline, options):
        import dask.distributed as ddist
        from apache_beam.runners.dask.dask_runner import DaskOptions

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        DaskOptions._extract_bag_kwargs(dask_options)  # takes the bag's own flags (npartitions) out: not Client's
        local_workers = options.view_as(LocalDaskOptions).dask_local_workers
        # dask sets its own loggers to INFO; follow the CLI's level instead (WARNING unless asked).
        logging.getLogger("distributed").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
        cluster = None
        if not dask_options.get("address") and not dask_options.get("scheduler_file"):
            n = local_workers or os.cpu_count() or 1
            cluster = ddist.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
            dask_options["address"] = cluster.scheduler_address
            log.info("started a local Dask cluster of %d workers at %s", n, cluster.scheduler_address)
        try:
            client = ddist.Client(**dask_options)
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
        try:
            threads = sum(client.nthreads().values()) or 1
            _trim_workers(client)
            _, total = translate_pipeline(pipeline, options, threads)
            # optimize_graph=False: dask's fusion makes partitions lazy iterators, and a lazy partition
            # read by two consumers is exhausted by the first (seen as wrong joins in dedup).
            futures = [client.compute(total, optimize_graph=False)]
        except BaseException:
            client.close()
            if cluster is not None:
                cluster.close()
            raise
        return DaskRunResult(client, futures, cluster)
