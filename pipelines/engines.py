"""Execution engines behind the stage flags: ``--runner dask`` and a Dask runner that keeps every record."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
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


class LocalDaskOptions(PipelineOptions):
    """The one Dask flag Beam lacks: the size of a local cluster started for a single run."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dask_local_workers", type=int, default=None,
            help="without --dask_client_address: start a local Dask cluster of this many worker "
            "processes (1 thread each) for this run and stop it afterwards (default: CPU count)",
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


def _windowed(item: t.Any):
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    return item if isinstance(item, WindowedValue) else WindowedValue(item, 0, (GlobalWindow(),))


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


def _run_dofn_partition(items, spec_bytes: bytes, *side_values):
    """One bundle = one Dask partition: setup, start_bundle, process every element, finish_bundle
    (whose outputs are kept), teardown. The DoFn is unpickled here, fresh per partition: a DoFn
    set up in place (clients, threads, event loops) must never be shared by two partitions or be
    shipped to another worker."""
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
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return out


def _select_tag(partition, tag):
    if tag is None:
        return [v for v in partition if not isinstance(v, beam.pvalue.TaggedOutput)]
    return [v.value for v in partition if isinstance(v, beam.pvalue.TaggedOutput) and v.tag == tag]


def _concat(lists):
    return list(itertools.chain.from_iterable(lists))


def _chunks(parts: list, n: int) -> list[list]:
    """Split a list of partitions into at most ``n`` runs of neighbours (order kept)."""
    size = max(1, -(-len(parts) // n))
    return [parts[i:i + size] for i in range(0, len(parts), size)] or [[]]


def _split_by_key(partitions: list, n: int) -> tuple:
    """Hash-partition the ``(key, value)`` elements of some partitions into ``n`` buckets by a
    process-independent hash (Python's ``hash`` is salted per process; workers are processes)."""
    from dask.base import tokenize

    buckets: list[list] = [[] for _ in range(n)]
    for partition in partitions:
        for kv in partition:
            buckets[int(tokenize(kv[0]), 16) % n].append(kv)
    return tuple(buckets)


def _merge_groups(buckets: list[list]) -> list:
    """One output partition of a GroupByKey: ``(key, [values])`` in first-seen order. Values arrive
    as Beam's ReifyWindows left them (``WindowedValue``); the grouped output carries plain values."""
    from apache_beam.utils.windowed_value import WindowedValue

    groups: dict = {}
    for bucket in buckets:
        for key, value in bucket:
            groups.setdefault(key, []).append(value.value if isinstance(value, WindowedValue) else value)
    return list(groups.items())


class _Translator(beam.pipeline.PipelineVisitor):
    """Build one dask bag per leaf transform; remember which bags nothing consumes (the sinks)."""

    def __init__(self, bag_kwargs: dict, partitions: int):
        from apache_beam.runners.dask.overrides import (
            _Create, _Flatten, _GroupAlsoByWindow, _GroupByKeyOnly, _Read, _Reshuffle,
        )

        self.bag_kwargs = bag_kwargs
        self.partitions = partitions  # of every shuffle's output (GroupByKey, Reshuffle, Flatten)
        self.bags: dict = {}
        self.consumed: set = set()
        self._kinds = {
            _Create: self._create, _Flatten: self._flatten, _GroupByKeyOnly: self._group,
            _GroupAlsoByWindow: self._identity, _Reshuffle: self._reshuffle, _Read: self._unsupported,
        }

    def _input_bag(self, pcoll):
        """The bag of one input PCollection: its producer's bag, narrowed to its tag when the producer
        is a multi-output ParDo."""
        producer = pcoll.producer
        self.consumed.add(producer)
        bag = self.bags[producer]
        if isinstance(producer.transform, beam.ParDo) and len(producer.outputs) > 1:
            tag = next(k for k, v in producer.outputs.items() if v is pcoll)
            bag = bag.map_partitions(_select_tag, None if tag in (None, "None") else tag)
        return bag

    def visit_transform(self, node) -> None:
        transform = node.transform
        kind = self._kinds.get(type(transform))
        if kind is None and isinstance(transform, beam.ParDo):
            kind = self._pardo
        if kind is None:
            self._unsupported(node)
        inputs = [self._input_bag(pc) for pc in node.main_inputs.values() if not isinstance(pc, beam.pvalue.PBegin)]
        self.bags[node] = kind(node, inputs)

    # one method per translated transform: (node, input bags) -> bag
    def _unsupported(self, node, inputs=None):
        raise NotImplementedError(
            f"the Dask engine cannot run {node.full_label!r} ({type(node.transform).__name__}): Beam's Dask "
            "runner translates only Create, ParDo, GroupByKey, Flatten and Reshuffle; use the DirectRunner "
            "or Dataflow for this stage"
        )

    def _create(self, node, inputs):
        import dask.bag as db

        values = list(node.transform.values)
        npartitions = self.bag_kwargs.get("npartitions")
        size = self.bag_kwargs.get("partition_size")
        if not npartitions and not size:
            size = 128
        if not values:  # an empty Create still needs one (empty) partition to flow through
            return db.from_delayed([_empty()])
        return db.from_sequence(values, npartitions=npartitions, partition_size=size)

    def _flatten(self, node, inputs):
        import dask
        import dask.bag as db

        if not inputs:
            return db.from_delayed([_empty()])
        parts = [d for bag in inputs for d in bag.to_delayed(optimize_graph=False)]
        # Concatenating bags adds up their partitions; merge neighbours so a Flatten -> ParDo chain
        # (CoGroupByKey's tagging, dedup's rounds) runs as at most P tasks, not the sum of its inputs.
        return db.from_delayed([dask.delayed(_concat, pure=True)(chunk) for chunk in _chunks(parts, self.partitions)])

    def _identity(self, node, inputs):
        return inputs[0]

    def _reshuffle(self, node, inputs):
        # Spread the elements over the cluster's threads (order kept, so outputs stay deterministic).
        return inputs[0].repartition(npartitions=max(inputs[0].npartitions, self.partitions))

    def _group(self, node, inputs):
        # Our own all-to-all shuffle into exactly P partitions. dask.bag's groupby keeps the input's
        # partition count, so Flatten -> GroupByKey chains (CoGroupByKey, dedup's rounds) multiply
        # partitions into tens of thousands of tiny tasks; merging partitions with Bag.repartition
        # before it gave wrong joins in dedup (seen here with dask 2026.8), so it is not used.
        import dask
        import dask.bag as db

        n = self.partitions
        parts = inputs[0].to_delayed(optimize_graph=False)
        splits = [dask.delayed(_split_by_key, pure=True, nout=n)(chunk, n) for chunk in _chunks(parts, n)]
        merged = [dask.delayed(_merge_groups, pure=True)([s[j] for s in splits]) for j in range(n)]
        return db.from_delayed(merged)

    def _pardo(self, node, inputs):
        import cloudpickle
        import dask
        import dask.bag as db

        transform = node.transform
        args, kwargs = transform.raw_side_inputs
        sides = list(node.side_inputs)
        spec = _ParDoSpec(
            fn=transform.fn, label=node.full_label, args=list(args), kwargs=dict(kwargs),
            side_views=[(type(si), si._view_options(), si._window_mapping_fn) for si in sides],
        )
        side_items = []
        for si in sides:
            self.consumed.add(si.pvalue.producer)
            bag = self._input_bag(si.pvalue)
            # Materialised once, in the same graph, and handed whole to every partition that reads it.
            side_items.append(dask.delayed(_concat, pure=True)(bag.to_delayed(optimize_graph=False)))
        # The pickled DoFn is one graph value shared by every partition's task (not a copy per task).
        spec_bytes = dask.delayed(cloudpickle.dumps(spec), pure=False, traverse=False)
        # Plain delayed calls, not Bag.map_partitions: a bag that is both a main input and, through an
        # Item argument, a side input was computed twice (once per worker; dask 2026.8), and a DoFn's
        # side effects (requests, writes) must run once.
        return db.from_delayed([
            dask.delayed(_run_dofn_partition, pure=True)(part, spec_bytes, *side_items)
            for part in inputs[0].to_delayed(optimize_graph=False)
        ])

    def sinks(self) -> list:
        return [bag for node, bag in self.bags.items() if node not in self.consumed]


def _sum(counts) -> int:
    return sum(counts)


def _no_elements() -> list:
    return []


def _empty():
    import dask

    return dask.delayed(_no_elements, pure=True)()


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
        import dask
        import dask.distributed as ddist
        from apache_beam.runners.dask.dask_runner import DaskOptions
        from apache_beam.runners.dask.overrides import dask_overrides

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
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
            pipeline.replace_all(dask_overrides())
            translator = _Translator(bag_kwargs, partitions=bag_kwargs.get("npartitions") or threads)
            pipeline.visit(translator)
            # Every sink is reduced to its element count so nothing but small ints travels back.
            sinks = translator.sinks()
            log.info("Dask engine: %d transforms, %d sinks, %d partitions per shuffle",
                     len(translator.bags), len(sinks), translator.partitions)
            # Every sink reduced to its element count, all in ONE collection: computing several
            # collections that share upstream tasks ran those tasks once per collection (seen here:
            # every DoFn twice), and side effects (requests, writes) must run once.
            total = dask.delayed(_sum, pure=False)([bag.count() for bag in sinks])
            # optimize_graph=False: dask.bag's fusion makes partitions lazy iterators, and a lazy partition
            # read by two consumers is exhausted by the first (seen as wrong joins in dedup).
            futures = [client.compute(total, optimize_graph=False)]
        except BaseException:
            client.close()
            if cluster is not None:
                cluster.close()
            raise
        return DaskRunResult(client, futures, cluster)
