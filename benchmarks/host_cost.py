"""Host-side overhead of the fast AimKP step against plain SFT: ATen ops, host-device syncs and hook calls.

Counts per micro-batch, and where in the fast step each comes from.

    python benchmarks/host_cost.py [--model llava-576|qwen2vl|...] [--batch 8] [--strides 2] [--buffer-mb 1024]
                                   [--device cpu|cuda] [--bf16] [--out FILE]

The model, the batch of demo CMKP posts, the step configuration and the curriculum state at stride γ (text and image
alike, every sample at γ, not frozen) are ``benchmarks/step_cost.py``'s: a tiny model built by LLaMA-Factory's own
loader with LoRA r8 on all linear layers of the language model, the projector trained and gradient checkpointing on.
The fast step plans its passes as on an accelerator, whatever device this runs on: its cap on a pass's padded tokens
(``max_tokens_per_forward``) is :func:`~aimkp_plugin.method.pass_planning.default_max_tokens` for a non-CPU device,
the per-copy gradient buffer is bounded by 1024 MiB (``--buffer-mb``; what ``aimkp_fast_buffer_mb: auto`` gives off a
GPU, where free device memory cannot be read), and
the shared prefix is off (what ``aimkp_fast_share_prefix: auto`` resolves to on an accelerator).

Each step runs once unmeasured, then once under a ``TorchDispatchMode`` that counts every ATen op it dispatches
(forward and backward): for plain SFT one forward and backward of the padded batch, for the fast step one call of
``fast_batch_step`` (the curriculum state it starts from is built before). The trainer's split of the padded batch
into samples (``BatchSplitter.split``, which runs before the fast step on every micro-batch) is counted apart.

Host-device syncs are counted by op identity, as the ops that make the host wait on CUDA: ``_local_scalar_dense``
(``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor), ``nonzero``, ``item``, ``equal``, ``is_nonzero``,
``masked_select``, ``unique*``, indexing with a boolean mask (``index`` / ``index_put_``, whose kernel runs a
``nonzero``), and blocking copies between the host and a device (``_to_copy`` / ``copy_`` across device types). On a
CPU-only run source and target of a copy are both the CPU, so ``.cpu()``, ``.tolist()`` and ``.to(device)`` dispatch
nothing; there the JSON counts the ``_to_copy`` calls with a ``device=cpu`` argument as the device-to-host copies, and
the Python-level calls that move tensors between host and device on an accelerator (``Tensor.cpu``, ``tolist``,
``numpy``, ``to`` with a device, ``cuda``; ``torch.tensor`` / ``torch.as_tensor`` with a device) are counted apart as
``transfer_calls_*``: each is a sync on CUDA when its source and target differ, a no-op otherwise. Every sync and
transfer is attributed to the innermost ``aimkp_plugin`` function on the Python stack (with its line), to the chain of
``aimkp_plugin`` functions above it and to the library function inside it, if any; every op to the innermost
``aimkp_plugin`` function and line (a backward's ops to the line that calls it, or to the hook running them).

The fast step's Python hook callbacks are counted by wrapping :class:`~aimkp_plugin.method.row_gradients.RowGradients`'
forward hook, the tensor hook's work (one call per output-gradient hook) and the post-accumulate hook for the measured
step; its passes and buffer groups by wrapping ``run_pass`` and ``train_rows`` in ``aimkp_plugin.method.fast_step``.
The wrappers live only in this process and only during the measured step. The padding fraction is the padded tokens
over all tokens of the fast step's passes: ``Σ (rows × longest − Σ row lengths) / Σ rows × longest``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, StepBench, build, emit_report, tiny_shape  # noqa: E402


PLUGIN_DIR = str(Path(__file__).resolve().parents[1] / "aimkp_plugin") + os.sep
THIS_FILE = str(Path(__file__).resolve())
SYNC_PACKETS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero", "masked_select"}
MASK_INDEX_PACKETS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def plugin_frames(frame: Any) -> list[str]:
    """The ``aimkp_plugin`` functions on the stack from ``frame`` outwards, innermost first, as
    ``module.function:line``."""
    found = []
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(PLUGIN_DIR):
            module = code.co_filename[len(PLUGIN_DIR) : -len(".py")].replace(os.sep, ".")
            found.append(f"{module}.{getattr(code, 'co_qualname', code.co_name)}:{frame.f_lineno}")
        frame = frame.f_back
    return found


def outside_frame(frame: Any) -> str | None:
    """The innermost frame outside torch, this script and ``aimkp_plugin`` (a transformers or peft function), as
    ``path:function:line`` from the package folder on, when it sits inside the innermost ``aimkp_plugin`` frame."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PLUGIN_DIR):
            return None
        parts = Path(filename).parts
        if filename != THIS_FILE and "torch" not in parts and "site-packages" in parts:
            short = "/".join(parts[parts.index("site-packages") + 1 :])
            code = frame.f_code
            return f"{short}:{getattr(code, 'co_qualname', code.co_name)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def site_of(frame: Any) -> dict[str, str]:
    """Where a call comes from: the innermost ``aimkp_plugin`` function and line, the chain of ``aimkp_plugin``
    functions (outermost first), and the innermost library frame inside them, if any."""
    frames = plugin_frames(frame)
    site = {"site": frames[0] if frames else "(outside aimkp_plugin)"}
    if frames:
        site["chain"] = " > ".join(name.split(":")[0].split(".")[-1] for name in reversed(frames))
    library = outside_frame(frame)
    if library:
        site["library"] = library
    return site


def device_of(value: Any) -> torch.device | None:
    return torch.device(value) if isinstance(value, (str, torch.device)) else None


class Tally:
    """Counts of one measured region: ops by name and by ``aimkp_plugin`` function, syncs and transfers by kind and
    by call site."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.ops_by_function: Counter[str] = Counter()
        self.ops_by_site: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.sync_sites: Counter[tuple[str, str, str, str]] = Counter()
        self.transfers: Counter[str] = Counter()
        self.transfer_sites: Counter[tuple[str, str, str, str]] = Counter()

    def add_sync(self, kind: str, frame: Any) -> None:
        self.syncs[kind] += 1
        site = site_of(frame)
        self.sync_sites[(kind, site["site"], site.get("chain", ""), site.get("library", ""))] += 1

    def add_transfer(self, kind: str, frame: Any) -> None:
        self.transfers[kind] += 1
        site = site_of(frame)
        self.transfer_sites[(kind, site["site"], site.get("chain", ""), site.get("library", ""))] += 1

    @staticmethod
    def sites(counter: Counter[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
        rows = []
        for (kind, site, chain, library), count in counter.most_common():
            row = {"op": kind, "count": count, "site": site}
            row.update({"chain": chain} if chain else {})
            row.update({"library": library} if library else {})
            rows.append(row)
        return rows


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active into ``tally``, and the ops that make the host wait on CUDA."""

    def __init__(self, tally: Tally, run_device: str) -> None:
        super().__init__()
        self.tally, self.run_device = tally, run_device

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        self.tally.ops[str(func)] += 1
        frames = plugin_frames(frame)
        self.tally.ops_by_function[frames[0].split(":")[0] if frames else "(outside aimkp_plugin)"] += 1
        self.tally.ops_by_site[frames[0] if frames else "(outside aimkp_plugin)"] += 1
        kind = self.sync_kind(func, args, kwargs)
        if kind:
            self.tally.add_sync(kind, frame)
        return func(*args, **kwargs)

    def sync_kind(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        packet = func.overloadpacket.__name__
        if packet in SYNC_PACKETS:
            return packet
        if packet.startswith(("unique", "_unique")):
            return packet
        if packet in MASK_INDEX_PACKETS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(torch.is_tensor(index) and index.dtype in (torch.bool, torch.uint8) for index in indices):
                return f"{packet} (boolean mask)"
            return None
        if packet == "_to_copy" and torch.is_tensor(args[0]) and "device" in kwargs:
            source, target = args[0].device, torch.device(kwargs["device"])
            if source.type != target.type and not kwargs.get("non_blocking", False):
                return "_to_copy (device→host)" if target.type == "cpu" else "_to_copy (host→device)"
            if self.run_device == "cpu" and target.type == "cpu":
                return "_to_copy (device=cpu)"
        if packet == "copy_" and len(args) > 1 and torch.is_tensor(args[1]):
            target, source = args[0].device, args[1].device
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if source.type != target.type and blocking:
                return "copy_ (device→host)" if target.type == "cpu" else "copy_ (host→device)"
        return None


@contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``make(original)`` while active (a class's staticmethod stays one)."""
    own = name in vars(owner)  # else inherited (torch.Tensor's methods of its C base): deleted again afterwards
    original = vars(owner)[name] if own else getattr(owner, name)
    if isinstance(original, staticmethod):
        setattr(owner, name, staticmethod(make(original.__func__)))
    else:
        setattr(owner, name, make(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def transfer_wrappers(tally: Tally, run_device: str) -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """Wrappers of the Python calls that move a tensor between host and device on an accelerator. On a CPU run every
    such call is counted (source and target cannot differ here); on an accelerator only those whose source and
    target differ."""

    def counted(kind: str, moves: Callable[[tuple, dict], bool | None]) -> Callable[[Any], Any]:
        """``moves(args, kwargs)``: None when the call moves nothing (``.to(dtype)``, a factory without a device),
        else whether its source and target differ."""

        def make(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                crosses = moves(args, kwargs)
                if crosses is not None and (run_device == "cpu" or crosses):
                    tally.add_transfer(kind, sys._getframe(1))
                return original(*args, **kwargs)

            return wrapper

        return make

    def to_host(args: tuple, kwargs: dict) -> bool:
        return args[0].device.type != "cpu"

    def to_device(args: tuple, kwargs: dict) -> bool | None:
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        target = target.device if torch.is_tensor(target) else device_of(target)
        return None if target is None else target.type != args[0].device.type

    def from_host(args: tuple, kwargs: dict) -> bool | None:
        target = device_of(kwargs.get("device"))
        return None if target is None else target.type != "cpu"

    return [
        (torch.Tensor, "cpu", counted("Tensor.cpu", to_host)),
        (torch.Tensor, "tolist", counted("Tensor.tolist", to_host)),
        (torch.Tensor, "numpy", counted("Tensor.numpy", to_host)),
        (torch.Tensor, "cuda", counted("Tensor.cuda", lambda args, kwargs: args[0].device.type == "cpu")),
        (torch.Tensor, "to", counted("Tensor.to(device)", to_device)),
        (torch, "tensor", counted("torch.tensor(device=)", from_host)),
        (torch, "as_tensor", counted("torch.as_tensor(device=)", from_host)),
    ]


@contextmanager
def counting(tally: Tally, run_device: str) -> Iterator[None]:
    """Ops, syncs and transfer calls into ``tally`` while active."""
    with ExitStack() as stack:
        for owner, name, make in transfer_wrappers(tally, run_device):
            stack.enter_context(patched(owner, name, make))
        stack.enter_context(OpCounter(tally, run_device))
        yield


@dataclasses.dataclass
class FastRecord:
    """What the measured fast step did: its hook callbacks, its passes (rows and their lengths) and buffer groups."""

    hooks: Counter[str] = dataclasses.field(default_factory=Counter)
    passes: list[list[int]] = dataclasses.field(default_factory=list)
    groups: int = 0


@contextmanager
def recording(record: FastRecord) -> Iterator[None]:
    """Count ``RowGradients``' hook callbacks, ``run_pass``'s passes and ``train_rows``' groups while active."""
    from aimkp_plugin.method import fast_step
    from aimkp_plugin.method.row_gradients import RowGradients

    def hook(name: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                record.hooks[name] += 1
                return original(*args, **kwargs)

            return wrapper

        return make

    def passes(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(layout: Any, samples: Any, rows: Any, forward: Any, *args: Any, **kwargs: Any) -> Any:
            record.passes.append([len(row.keep) for row in rows[forward.rows]])
            return original(layout, samples, rows, forward, *args, **kwargs)

        return wrapper

    def groups(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            record.groups += 1
            return original(*args, **kwargs)

        return wrapper

    with ExitStack() as stack:
        stack.enter_context(patched(RowGradients, "_linear_forward_hook", hook("forward_hooks")))
        # one call per output-gradient (tensor) hook that the forward hook registered and autograd fired
        stack.enter_context(patched(RowGradients, "_linear_row_gradients", hook("tensor_hooks")))
        stack.enter_context(patched(RowGradients, "_drop_summed_gradient", hook("post_accumulate_hooks")))
        stack.enter_context(patched(fast_step, "run_pass", passes))
        stack.enter_context(patched(fast_step, "train_rows", groups))
        yield


def padding(passes: list[list[int]]) -> tuple[int, int]:
    """Padded tokens and all tokens (rows × longest) over ``passes``."""
    total = sum(len(lengths) * max(lengths) for lengths in passes)
    return total - sum(sum(lengths) for lengths in passes), total


def accelerator_cap(bench: StepBench, stride: int) -> int:
    """The fast step's automatic cap on a pass's padded tokens as on an accelerator (``default_max_tokens`` for a
    non-CPU device, over the micro-batch's rows at ``stride``)."""
    from aimkp_plugin.families import family_for
    from aimkp_plugin.method.pass_planning import default_max_tokens, plan_rows

    family = family_for(bench.model.config)
    rows, _ = plan_rows(bench.samples, bench.state_at(stride), bench.config, family.removes_hidden_tokens)
    return default_max_tokens(bench.samples, rows, torch.device("cuda"))


def top_differences(fast: Counter[str], sft: Counter[str], count: int = 25) -> list[dict[str, Any]]:
    names = set(fast) | set(sft)
    ranked = sorted(names, key=lambda name: (-(fast[name] - sft[name]), name))[:count]
    return [
        {"op": name, "fast": fast[name], "sft": sft[name], "difference": fast[name] - sft[name]} for name in ranked
    ]


def measure_split(bench: StepBench, tokenizer: Any, run_device: str) -> Tally:
    """The trainer's split of the padded batch into samples, counted."""
    from aimkp_plugin.integration.batches import BatchSplitter

    splitter = BatchSplitter(bench.model.config, tokenizer)
    indices = list(range(bench.batch_size))
    splitter.split(bench.batch, indices)  # unmeasured first, as the steps
    tally = Tally()
    with counting(tally, run_device):
        splitter.split(bench.batch, indices)
    return tally


def measure_stride(bench: StepBench, stride: int, run_device: str) -> tuple[Tally, FastRecord, int]:
    """One fast step at ``stride`` counted: ops, syncs and transfers inside ``fast_batch_step`` only (not the
    benchmark's building of the state), its hook calls, passes and groups."""
    from aimkp_plugin.method import fast_step

    bench.max_tokens = accelerator_cap(bench, stride)
    bench.fast(stride)  # unmeasured first
    tally, record = Tally(), FastRecord()

    def counted(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with counting(tally, run_device):
                return original(*args, **kwargs)

        return wrapper

    with recording(record), patched(fast_step, "fast_batch_step", counted):
        bench.fast(stride)  # StepBench.fast imports fast_batch_step from the module when called
    return tally, record, bench.max_tokens


NOTES = [
    "ops_*: ATen ops dispatched per micro-batch, counted by a TorchDispatchMode around one whole step after one "
    "unmeasured run: plain SFT's forward and backward of the padded batch; fast_batch_step for fast (its forwards, "
    "backwards, per-row gradient products, Gram matrix and the combination into .grad). The split of the padded "
    "batch into samples, which the trainer runs before the fast step, is counted apart (ops_split).",
    "syncs_*: ops that make the host wait on CUDA, counted by op identity: _local_scalar_dense (item(), int(), "
    "float(), bool() of a tensor), nonzero, item, equal, is_nonzero, masked_select, unique*, index / index_put_ "
    "with a boolean mask (a nonzero inside the kernel), and blocking _to_copy / copy_ between the host and a device.",
    "On a CPU-only run a copy's source and target are both the CPU: .cpu(), .tolist() and .to(device) of a CPU "
    "tensor dispatch no op, so device-to-host copies cannot be told apart there. syncs_* then counts _to_copy calls "
    "with a device=cpu argument as the device-to-host copies, and transfer_calls_* counts the Python calls that "
    "copy between host and device on an accelerator (Tensor.cpu, tolist, numpy, cuda, to with a device; "
    "torch.tensor / torch.as_tensor with a device): each is a sync on CUDA (a blocking copy synchronises the "
    "stream, host-to-device too) when its source and target differ, and a no-op when the tensor is already there. "
    "On CUDA transfer_calls_* counts only those that cross.",
    "Conversely, ops on tensors that stay on the host in an accelerator run (the curriculum state, the planned rows' "
    "keep positions, the Gram matrix once moved to the host) are no syncs there, and on a CPU run a same-device cast "
    "such as x.to(device=y.device, dtype=...) also carries device=cpu; sync_sites_* and transfer_sites_* name the "
    "function and line of each, to tell them apart.",
    "The fast step plans as on an accelerator: max_tokens_per_forward is default_max_tokens for a non-CPU device, "
    "max_buffer_bytes is --buffer-mb MiB, the shared prefix is off (auto on an accelerator).",
    "hook_calls_fast: Python callbacks of RowGradients in the measured fast step: forward hooks on the hooked "
    "Linear layers (they fire again in gradient checkpointing's recomputation), output-gradient tensor hooks that "
    "form per-row gradients, and post-accumulate hooks that drop the summed gradient.",
    "padding_fraction: padded tokens over all tokens of the fast step's passes, sum of (rows x longest - sum of row "
    "lengths) over sum of rows x longest; padding_fraction_sft: the same for the padded SFT batch.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-576", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--strides", default="2", help="comma-separated γ values (text and image alike)")
    parser.add_argument(
        "--buffer-mb", type=int, default=1024, help="aimkp_fast_buffer_mb: per-copy gradient buffer (0: no limit)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (as LLaMA-Factory's bf16: true)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    strides = [int(value) for value in options.strides.split(",")]

    with tempfile.TemporaryDirectory() as workdir:
        model, batch, tokenizer = build(Path(workdir), options.model, options.batch, options.device, options.bf16)
    buffer_bytes = options.buffer_mb * 2**20 or None
    bench = StepBench(
        model, batch, tokenizer, options.batch, options.device, options.bf16, 0, buffer_bytes, share_prefix=False
    )

    bench.plain()  # unmeasured first
    sft = Tally()
    with counting(sft, options.device):
        bench.plain()
    split = measure_split(bench, tokenizer, options.device)

    by_stride = {}
    for stride in strides:
        fast, record, cap = measure_stride(bench, stride, options.device)
        padded, total = padding(record.passes)
        hooks = sum(record.hooks.values())
        by_stride[f"stride_{stride}"] = {
            "ops_fast": sum(fast.ops.values()),
            "ops_sft": sum(sft.ops.values()),
            "ops_fast_over_sft": round(sum(fast.ops.values()) / sum(sft.ops.values()), 3),
            "syncs_fast": sum(fast.syncs.values()),
            "syncs_sft": sum(sft.syncs.values()),
            "transfer_calls_fast": sum(fast.transfers.values()),
            "transfer_calls_sft": sum(sft.transfers.values()),
            "syncs_by_op": {"fast": dict(fast.syncs.most_common()), "sft": dict(sft.syncs.most_common())},
            "transfer_calls_by_kind": {
                "fast": dict(fast.transfers.most_common()),
                "sft": dict(sft.transfers.most_common()),
            },
            "passes": len(record.passes),
            "rows": sum(len(lengths) for lengths in record.passes),
            "groups": record.groups,
            "max_tokens_per_forward": cap,
            "padding_fraction": round(padded / total, 4),
            "padded_tokens": padded,
            "pass_tokens": total,
            "pass_row_lengths": record.passes,
            "hook_calls_fast": {**dict(sorted(record.hooks.items())), "total": hooks},
            "hook_calls_fast_per_pass": round(hooks / max(len(record.passes), 1), 1),
            "top_op_differences_fast_minus_sft": top_differences(fast.ops, sft.ops),
            "ops_by_function_fast": dict(fast.ops_by_function.most_common()),
            "ops_by_site_fast": dict(fast.ops_by_site.most_common(40)),
            "sync_sites_fast": Tally.sites(fast.sync_sites),
            "transfer_sites_fast": Tally.sites(fast.transfer_sites),
        }
    lengths = [int(sample.model_inputs["input_ids"].shape[1]) for sample in bench.samples]
    padded_sft = batch["input_ids"].numel() - sum(lengths)
    report = {
        "model": f"tiny {options.model} ({tiny_shape(options.model)}), LoRA r8 on all linear layers + projector",
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "dtype": "bfloat16" if options.bf16 else "float32",
        "threads": torch.get_num_threads(),
        "batch": options.batch,
        "stride": strides[0],
        "buffer_mb": options.buffer_mb,
        "share_prefix": False,
        "sequence_lengths": lengths,
        "padded_batch_shape_sft": list(batch["input_ids"].shape),
        "padding_fraction_sft": round(padded_sft / batch["input_ids"].numel(), 4),
        "image_tokens_per_sample": [len(sample.spans.image_positions) for sample in bench.samples],
        "text_tokens_per_sample": [len(sample.spans.text) for sample in bench.samples],
        "answer_tokens": bench.tokens,
        "trainable_parameters": sum(parameter.numel() for parameter in bench.parameters),
        **by_stride[f"stride_{strides[0]}"],
        "ops_split": sum(split.ops.values()),
        "syncs_split": sum(split.syncs.values()),
        "transfer_calls_split": sum(split.transfers.values()),
        "syncs_by_op_split": dict(split.syncs.most_common()),
        "transfer_calls_by_kind_split": dict(split.transfers.most_common()),
        "sync_sites_split": Tally.sites(split.sync_sites),
        "transfer_sites_split": Tally.sites(split.transfer_sites),
        "sync_sites_sft": Tally.sites(sft.sync_sites),
        "transfer_sites_sft": Tally.sites(sft.transfer_sites),
        "ops_by_op_sft": dict(sft.ops.most_common()),
        "notes": NOTES,
    }
    if len(strides) > 1:  # the fields above are the first stride's; every stride's here
        report["by_stride"] = by_stride
    emit_report(report, options.out)


if __name__ == "__main__":
    main()
