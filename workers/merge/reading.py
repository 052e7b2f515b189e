"""Reading the inputs' tensors for a method, onto the compute device.

:class:`InputReader` hands a method one tensor of every input: whole (each input read when
the method first asks for it, from a read-ahead thread that follows the order of the pass)
or streamed in blocks into reused buffers (workers/merge/blocks.py). Either way every input
is checked for NaN/Inf once, and a damaged checkpoint is named. On a GPU the reads go into
pinned buffers and on to the device asynchronously (workers/merge/transfer.py): the
read-ahead threads issue the copies, the merge waits only for the copies of what it uses.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import torch

from merging.inputs import Block
from workers.errors import InputError
from workers.merge import blocks as streaming
from workers.merge.inputs import InputModel
from workers.merge.plan import PlannedTensor
from workers.merge.readahead import ReadAhead
from workers.merge.transfer import DeviceTransfer, Uploaded
from workers.merge.vocabulary import OutputVocabulary, is_vocabulary_tensor


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf. aminmax propagates NaN and is ~15× faster than isfinite().all()."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _stretch_block(start: int, stop: int, views: list[torch.Tensor], *, has_base: bool) -> Block:
    """A streamed block over the views of the reused buffers (the base's first, if any)."""
    base_view = views[0] if has_base else None
    model_views = views[1:] if has_base else views
    return Block(
        start,
        stop,
        (stop - start,),
        (lambda: base_view) if base_view is not None else None,
        model_views.__getitem__,
        reused=True,
    )


def _model_label(inp: InputModel, name: str) -> str:
    """The reference (as written) of the model that input ``inp``'s tensor ``name`` is
    from: a slice's source view may draw tensors from several models."""
    model_label = getattr(inp.reader, "model_label", None)
    return str(model_label(name)) if model_label is not None else inp.label


class InputReader:
    """Reads the inputs' tensors for the passes of one merge, onto the compute device."""

    def __init__(
        self,
        base: InputModel | None,
        models: list[InputModel],
        plan: dict[str, PlannedTensor],
        device: torch.device,
        vocabulary: OutputVocabulary | None = None,
        input_order: list[str] | None = None,
        transfer: DeviceTransfer | None = None,
    ) -> None:
        self.base = base
        self.models = models
        self.plan = plan
        self.device = device
        # how inputs reach the device: staged through pinned buffers on a GPU, as read on
        # the CPU
        self.transfer = transfer or DeviceTransfer.for_device(device)
        self.readahead: ReadAhead | None = None
        # a tokenizer plan: the tensors with a vocabulary axis are read aligned to it
        self.vocabulary = vocabulary
        self.input_order = input_order or []  # model labels in mergekit's order of inputs
        self._aligned: tuple[str, dict[int, torch.Tensor]] = ("", {})
        self._aligned_lock = threading.Lock()

    def aligns(self, name: str) -> bool:
        """Whether tensor ``name`` is read with its rows moved to the output vocabulary (it
        is then read whole, never streamed from the files)."""
        return self.vocabulary is not None and is_vocabulary_tensor(name)

    def aligned(self, key: int, name: str) -> torch.Tensor:
        """Input ``key``'s (-1: the base) tensor ``name`` in the output vocabulary. All the
        inputs' are made together (a row an input lacks may come from another) and each is
        handed out once, so at most one such set is held."""
        assert self.vocabulary is not None
        with self._aligned_lock:
            held, tensors = self._aligned
            if held != name or key not in tensors:
                inputs = self.inputs_of(name)
                labels = [_model_label(inp, name) for inp in inputs]
                rank = {label: i for i, label in reversed(list(enumerate(self.input_order)))}
                order = sorted(range(len(inputs)), key=lambda k: rank.get(labels[k], len(rank)))
                rows = self.vocabulary.align(
                    name, [(labels[k], inputs[k].reader.read(name)) for k in order]
                )
                tensors = {
                    -1 if inputs[k].index is None else int(inputs[k].index or 0): t
                    for k, t in zip(order, rows, strict=True)
                }
                self._aligned = (name, tensors)
            return tensors.pop(key)

    def holders(self, name: str) -> list[InputModel]:
        """The fine-tuned models that have tensor ``name``, in recipe order."""
        return [m for m in self.models if m.index in self.plan[name].holders]

    def inputs_of(self, name: str) -> list[InputModel]:
        """The base (if any) and the holders of tensor ``name``."""
        return ([self.base] if self.base is not None else []) + self.holders(name)

    def input_bytes(self, name: str) -> int:
        total = self.base.reader.info(name).nbytes if self.base and name in self.base.reader else 0
        return total + sum(m.reader.info(name).nbytes for m in self.models if name in m.reader)

    # -- whole tensors -----------------------------------------------------------------------

    def reading(self, names: list[str]) -> ReadAhead:
        """Start reading whole tensors ahead for a pass over ``names`` (a context manager);
        on a GPU the float ones are sent on to the device as soon as they are read."""
        self.readahead = ReadAhead(self._read_order(names), self._fetch)
        return self.readahead

    def _read_order(self, names: list[str]) -> list[tuple[int, str]]:
        """The order a pass reads inputs in: per tensor the base, then each holder."""
        order: list[tuple[int, str]] = []
        for name in names:
            p = self.plan[name]
            if self.base is not None:
                order.append((-1, name))
            if p.is_float:
                order += [(i, name) for i in p.holders]
            elif self.base is None and p.holders:
                order.append((p.holders[0], name))
        return order

    def _read_input(self, key: tuple[int, str]) -> torch.Tensor:
        i, name = key
        if self.aligns(name):
            return self.aligned(i, name)
        inp = self.base if i < 0 else self.models[i]
        assert inp is not None
        return inp.reader.read(name)

    def _fetch(self, key: tuple[int, str]) -> torch.Tensor | Uploaded:
        """Input ``key``'s tensor as stored: on the CPU, or (staged) on its way to the
        device through the pinned ring, read straight from the file into it."""
        i, name = key
        p = self.plan[name]
        if not self.transfer.staged or not p.is_float:
            return self._read_input(key)
        if self.aligns(name):
            host = self.aligned(i, name).reshape(-1)

            def fill(start: int, out: torch.Tensor) -> object:
                return out.copy_(host[start : start + out.numel()])
        else:
            inp = self.base if i < 0 else self.models[i]
            assert inp is not None
            reader = inp.reader

            def fill(start: int, out: torch.Tensor) -> object:
                return reader.read_into(name, start, out)

        return self.transfer.upload_from(p.numel, p.dtype, p.shape, fill)

    def _next(self, inp: InputModel, name: str) -> torch.Tensor | Uploaded:
        key = (-1 if inp.index is None else inp.index, name)
        return self.readahead.get(key) if self.readahead else self._fetch(key)

    def read(self, inp: InputModel, name: str) -> torch.Tensor:
        """The stored tensor on the CPU: from the read-ahead when it is next in the order."""
        got = self._next(inp, name)
        return got.cpu() if isinstance(got, torch.Tensor) else self.transfer.take(got).cpu()

    def _load(self, inp: InputModel, name: str, check: bool) -> torch.Tensor:
        """The stored tensor on the compute device, checked for NaN/Inf when asked."""
        got = self._next(inp, name)
        t = got.to(self.device) if isinstance(got, torch.Tensor) else self.transfer.take(got)
        if check and t.is_floating_point() and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(
                f"contains {bad} NaN or infinite value(s); refusing to merge a damaged checkpoint",
                model=inp.label,
                tensor=name,
            )
        return t

    # -- the blocks a method reads -----------------------------------------------------------

    def blocks(self, name: str, *, whole: bool) -> Callable[..., Iterator[Block]]:
        """``TensorInputs.blocks`` for tensor ``name``: the whole tensor as one block, or its
        flattened elements streamed a block at a time. Every input is checked for NaN/Inf
        on the first pass that asks for it."""
        p = self.plan[name]
        base, holders = self.base, self.holders(name)
        checked: set[int] = set()  # whole: the inputs already checked (-1: the base)
        passes_checked = [False]  # streamed: whether a checking pass has run

        def whole_tensor(check: bool = True, models: bool = True) -> Iterator[Block]:
            def load(i: int, inp: InputModel) -> torch.Tensor:
                t = self._load(inp, name, check=check and i not in checked)
                if check:
                    checked.add(i)
                return t

            read_base = (lambda: load(-1, base)) if base is not None else None
            yield Block(0, p.numel, p.shape, read_base, lambda j: load(j, holders[j]), reused=False)

        def streamed(check: bool = True, models: bool = True) -> Iterator[Block]:
            # models=False: the base alone (a method that holds the models' τ already)
            read = holders if models or base is None else []
            check = check and not passes_checked[0]
            passes_checked[0] = passes_checked[0] or (check and read is holders)
            inputs = ([base] if base is not None else []) + read
            for start, stop, views in self._stream(name, base, read):
                if check:
                    for inp, raw in zip(inputs, views, strict=True):
                        if not all_finite(raw):
                            self.raise_not_finite(inp, name)
                yield _stretch_block(start, stop, views, has_base=base is not None)

        return whole_tensor if whole else streamed

    def _stream(
        self, name: str, base: InputModel | None, holders: list[InputModel]
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """The blocks of every input of tensor ``name``, on the compute device. Staged (a
        GPU): each block is read into a pinned buffer and sent while the one before is
        computed, and the computation waits for exactly that block's copies."""
        p = self.plan[name]
        transfer = self.transfer
        if not transfer.staged:
            yield from streaming.stream_blocks(
                p.numel,
                p.dtype,
                self._block_reader(base, name) if base is not None else None,
                [self._block_reader(m, name) for m in holders],
            )
            return
        assert transfer.staging is not None

        def sending(inp: InputModel) -> Callable[[int, torch.Tensor], Uploaded]:
            fill = self._block_reader(inp, name, on_host=True)

            def send(start: int, out: torch.Tensor) -> Uploaded:
                transfer.before_fill(out)  # the copy out of this buffer has finished
                return transfer.upload(fill(start, out))

            return send

        for start, stop, sent in streaming.stream_blocks(
            p.numel,
            p.dtype,
            sending(base) if base is not None else None,
            [sending(m) for m in holders],
            depth=transfer.staging.read_ahead_blocks,
            block=transfer.staging.block_elements,
            empty=transfer.host_empty,
        ):
            yield start, stop, [transfer.take(u) for u in sent]

    def _block_reader(
        self, inp: InputModel, name: str, *, on_host: bool = False
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Reads a block of input ``inp``'s tensor ``name`` into a buffer, and hands it on
        the compute device (``on_host``: the buffer itself)."""
        to = torch.device("cpu") if on_host else self.device
        if self.aligns(name):
            whole: list[torch.Tensor] = []

            def read_aligned(start: int, out: torch.Tensor) -> torch.Tensor:
                if not whole:
                    key = -1 if inp.index is None else inp.index
                    whole.append(self.aligned(key, name).reshape(-1))
                out.copy_(whole[0][start : start + out.numel()])
                return out.to(to)

            return read_aligned

        def read(start: int, out: torch.Tensor) -> torch.Tensor:
            return inp.reader.read_into(name, start, out).to(to)

        return read

    def block_at(self, name: str, start: int, stop: int) -> Block:
        """Elements [start, stop) of every input of float tensor ``name`` (the base's
        first), read into buffers of their own, as a streamed block (for samples)."""
        p = self.plan[name]
        inputs = self.inputs_of(name)
        views = [
            self._block_reader(inp, name)(start, torch.empty(stop - start, dtype=p.dtype))
            for inp in inputs
        ]
        return _stretch_block(start, stop, views, has_base=self.base is not None)

    # -- naming a damaged input --------------------------------------------------------------

    def raise_not_finite(self, inp: InputModel, name: str) -> None:
        """InputError naming ``inp`` and how many non-finite values its tensor has."""
        bad = 0
        for start, stop in streaming.block_ranges(inp.reader.info(name).numel):
            t = inp.reader.read_into(
                name, start, torch.empty(stop - start, dtype=inp.reader.info(name).torch_dtype)
            )
            bad += int((~torch.isfinite(t)).sum())
        raise InputError(
            f"contains {bad} NaN or infinite value(s); refusing to merge a damaged checkpoint",
            model=inp.label,
            tensor=name,
        )

    def is_finite(self, inp: InputModel, name: str) -> bool:
        """Whether input ``inp``'s tensor ``name`` has no NaN or Inf (read block by block)."""
        info = inp.reader.info(name)
        if not info.torch_dtype.is_floating_point:
            return True
        for start, stop in streaming.block_ranges(info.numel):
            t = inp.reader.read_into(name, start, torch.empty(stop - start, dtype=info.torch_dtype))
            if not all_finite(t):
                return False
        return True
