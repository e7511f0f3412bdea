"""Recomputed decoder layers replayed as CUDA graphs (`speed.cuda_graphs`).

An offloaded QLoRA step on an 8B model launches about 10,000 kernels, most of them small (the
adapters' matmuls, casts, dequantization), and the GPU waits while Python launches them: 235 ms
of a 586 ms step eager, 97 of 469 with compiled layers (docs/benchmarks.md). A CUDA graph replays
a recorded sequence of kernels with one launch. The decoder layers of a model share their code
and shapes, so one layer's forward and backward are captured once, on a copy of the layer (the
template), and every layer replays them after its own tensors (weights, 4-bit quantization
statistics, adapters) are copied into the template's: one `torch._foreach_copy_` a dtype, 0.1 GB
a layer on an 8B 4-bit model. Measured on one H200 (docs/benchmarks.md): the GPU's wait fell to
31 ms of a 409 ms step, and the step ran as fast as compiled layers' (about 10,000 tokens/s), with
no compile time but a memory pool about 1 GiB larger than what compiled layers keep.
(`torch.cuda.make_graphed_callables` captures one graph set a module, for calls with gradients
only, and refuses modules with hooks: here one set serves every layer, the no-grad forward
replays too, and the fused adapters' norm hooks run inside the capture.)

The graphs keep what the forward saves for the backward in their own memory, so they serve only
layers recomputed by re-entrant checkpointing (`train/speed.py::_LayerCheckpoint`), whose
recomputation is followed at once by its backward; the first forward, without gradients, replays
the same forward graph. Each call shape (hidden states, keyword tensors such as a padding mask)
is captured when first seen, up to a limit, all in one memory pool; calls of further shapes, and
layers a graph cannot replay (dropout draws new random numbers each call; accelerate's hooks move
weights), run as they are.

    graphs = LayerGraphs()
    function = graphs.wrap(function, args)   # a layer's checkpointed call, as transformers gives it
"""

from __future__ import annotations

import collections
import copy
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten


_templates: weakref.WeakSet[_Template] = weakref.WeakSet()
_peak_before_capture = 0  # bytes: `torch.cuda.max_memory_allocated()` when the last capture ended


def graph_pool_bytes() -> int:
    """GPU memory the captured layers' graph pools hold beyond their live tensors: what their
    replays write (activations, dequantized weights) and `torch.cuda.memory_allocated` does not
    count, though no other tensor can use it."""
    return sum(template.idle_bytes for template in _templates)


def peak_memory_allocated() -> int:
    """`torch.cuda.max_memory_allocated()` with the graph pools' memory (`graph_pool_bytes`) from
    the capture on: the peak a run's memory figures report. A capture restarts the allocator's
    peak count (`_capture_ended`), so the pools are added to the peaks that ran beside them."""
    return max(_peak_before_capture, torch.cuda.max_memory_allocated() + graph_pool_bytes())


def reset_peak_memory() -> None:
    """Restart the count `peak_memory_allocated` reports (a run's start)."""
    global _peak_before_capture
    _peak_before_capture = 0
    torch.cuda.reset_peak_memory_stats()


def _capture_ended() -> None:
    global _peak_before_capture
    _peak_before_capture = max(_peak_before_capture, torch.cuda.max_memory_allocated() + graph_pool_bytes())
    torch.cuda.reset_peak_memory_stats()


class NotGraphable(Exception):
    """A layer call the captured graphs cannot stand in for; the message says why."""


def layer_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a layer's forward reads from the layer, in a fixed order: its parameters'
    data, its buffers, and the quantization statistics of its bitsandbytes 4-bit weights."""
    tensors = [parameter.data for parameter in layer.parameters()] + list(layer.buffers())
    seen: set[int] = set()  # by identity: peft's LoRA layer shows its base's weight as its own
    for module in layer.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            nested = getattr(state, "state2", None)
            found = [state.absmax, state.code, getattr(state, "offset", None)]
            found += [nested.absmax, nested.code] if nested is not None else []
            tensors += [tensor for tensor in found if isinstance(tensor, torch.Tensor)]
    return tensors


def by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by dtype, in order: `torch._foreach_copy_` copies a group of one dtype
    in a few kernels, and falls back to a kernel a tensor for a mixed list."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def not_graphable(layer: torch.nn.Module) -> str | None:
    """Why a layer's calls cannot be replayed from a captured graph, or None."""
    for name, module in layer.named_modules():
        where = f"{type(layer).__name__}.{name}" if name else type(layer).__name__
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and module.training:
            return f"{where} has dropout (p={module.p}): a replay would draw the same random numbers"
        if float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0 and module.training:
            return f"{where} has attention dropout: a replay would draw the same random numbers"
        if "_hf_hook" in vars(module):
            return f"{where} has accelerate hooks, which move its weights in each call"
    return None


def layer_call(function: Any) -> tuple[Callable[..., Any], torch.nn.Module] | None:
    """The unbound call and the layer of a checkpointed layer call as transformers gives it:
    `partial(forward, layer, **kwargs)` (transformers >= 5.2x), or `partial(super().__call__,
    **kwargs)` (earlier), whose bound `nn.Module.__call__` runs the layer without checkpointing.
    None for a function of another form."""
    if not isinstance(function, functools.partial):
        return None
    if len(function.args) == 1 and isinstance(function.args[0], torch.nn.Module):
        return function.func, function.args[0]
    layer = getattr(function.func, "__self__", None)
    if not function.args and isinstance(layer, torch.nn.Module):
        return function.func.__func__, layer
    return None


def call_signature(function: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What a replay must match of a checkpointed layer call, `function(*args)` (see
    `layer_call`): the call, the layer's class, the hidden states' and keyword tensors' shapes
    and devices, the other keyword values, the autocast state. None for a call of another form."""
    call = layer_call(function)
    if call is None or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    leaves, spec = tree_flatten(function.keywords)
    described: list[Any] = []
    for leaf in [args[0], *leaves]:
        if isinstance(leaf, torch.Tensor):
            described.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            described.append(leaf)
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (call[0], type(call[1]), repr(spec), tuple(described), autocast)


def _difference(captured: tuple[Any, ...], other: tuple[Any, ...]) -> str:
    """What a call's signature has other than the first captured one, in words."""
    if captured[:3] != other[:3]:
        return "another layer or other keyword arguments"
    if captured[3][0] != other[3][0]:
        return f"hidden states {other[3][0][0]}"
    if captured[3] != other[3]:
        return "other keyword values or shapes"
    return "another autocast state"


class _Replay(torch.autograd.Function):
    """A layer's call as the captured graphs: the forward graph with the layer's tensors loaded,
    then (for a recomputation) the backward graph, whose gradients are copied out."""

    @staticmethod
    def forward(ctx: Any, captured: CapturedLayer, sources: list[list[torch.Tensor]], keywords: list[Any],
                hidden: torch.Tensor, *trainable: torch.Tensor) -> torch.Tensor:
        captured.load(sources, keywords, hidden)
        captured.forward_graph.replay()
        ctx.captured = captured
        ctx.shapes = [parameter.shape for parameter in trainable]
        # A copy: the next replay writes over the graph's output, and the input's offload to
        # CPU memory (on a side stream) may still be reading it.
        return captured.output.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        captured = ctx.captured
        captured.grad_output.copy_(grad)
        captured.backward_graph.replay()
        grad_hidden = captured.grad_hidden.clone()  # copies: the next layer's replay reuses them
        grads: list[torch.Tensor] = []
        if captured.flat_grads is not None:
            flat = captured.flat_grads.clone()
            grads = [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in ctx.shapes]), ctx.shapes, strict=True)]
        return (None, None, None, grad_hidden, *grads)


class _Template:
    """The copy of a layer that graphs are captured on, shared by every captured call shape, with
    the memory pool they share (replays never overlap: a layer's recomputation and backward run
    back to back)."""

    def __init__(self, layer: torch.nn.Module, graphs: LayerGraphs) -> None:
        if getattr(layer, "_compiled_call_impl", None) is not None:
            # Measured: graphs of compiled layers ran no faster, and held more memory (docs/benchmarks.md).
            raise NotGraphable(f"{type(layer).__name__} is compiled; CUDA graphs replay eager layers")
        self.layer = copy.deepcopy(layer, {id(graphs): graphs})
        self.layer.gradient_checkpointing = False  # called directly: its call is what is captured
        tensors, sources = layer_tensors(self.layer), layer_tensors(layer)
        if [(t.shape, t.dtype) for t in sources] != [(t.shape, t.dtype) for t in tensors]:
            raise NotGraphable(f"a copy of {type(layer).__name__} holds other tensors than the layer")
        self.tensors = by_dtype(tensors)
        self.trainable = [parameter for parameter in self.layer.parameters() if parameter.requires_grad]
        if len({parameter.dtype for parameter in self.trainable}) > 1:
            raise NotGraphable("its trainable tensors have several dtypes")
        self.memory = torch.cuda.MemPool()
        self.idle_bytes = 0  # of the pool: see `graph_pool_bytes`

    def load(self, sources: list[list[torch.Tensor]]) -> None:
        """Copy a layer's tensors (`by_dtype(layer_tensors(layer))`) into the copy's."""
        for tensors, group in zip(self.tensors, sources, strict=True):
            torch._foreach_copy_(tensors, group)


class CapturedLayer:
    """One layer call's forward and backward, captured as CUDA graphs on the template."""

    def __init__(self, template: _Template, function: Any, hidden: torch.Tensor, signature: tuple[Any, ...]) -> None:
        self.template, self.signature = template, signature
        leaves, spec = tree_flatten(function.keywords)
        self.keywords = [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self._loaded: list[tuple[weakref.ref[torch.Tensor], int] | None] = [None] * len(leaves)
        self.hidden = hidden.detach().clone().requires_grad_(True)
        keywords = tree_unflatten(self.keywords, spec)

        def run() -> torch.Tensor:
            output = template.layer(self.hidden, **keywords)
            if not isinstance(output, torch.Tensor):
                raise NotGraphable(f"{type(template.layer).__name__} returns {type(output).__name__}, not a tensor")
            return output

        # Imported here: fused_lora brings peft and Triton, and the bench's timer imports this
        # module (for the memory figures) inside the peers' environments.
        from tuneforge.methods.fused_lora import backward_follows

        inputs = [self.hidden, *template.trainable]
        autocast = torch.autocast(  # the caller's autocast, without its cache of cast weights
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False
        )
        with torch.enable_grad(), autocast, backward_follows():
            # Warm-up on a side stream: kernels compile, libraries allocate workspaces, outside the graph.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    output = run()
                    torch.autograd.grad(output, inputs, torch.ones_like(output))
            torch.cuda.current_stream().wait_stream(side)
            del output
            pool = template.memory.id
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # thread_local: a data-loader thread pinning memory meanwhile does not void the capture.
            with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
                output = run()
            self.grad_output = torch.empty_like(output)
            with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(output, inputs, self.grad_output)
                self.grad_hidden = grads[0]
                self.flat_grads = torch.cat([grad.reshape(-1) for grad in grads[1:]]) if len(grads) > 1 else None
        self.output = output.detach()
        _capture_ended()  # before this capture's memory counts: the peak so far ran without it
        template.idle_bytes = sum(
            segment["total_size"] - segment["allocated_size"]
            for segment in torch.cuda.memory_snapshot() if tuple(segment.get("segment_pool_id", ())) == tuple(pool)
        )
        _templates.add(template)

    def load(self, sources: list[list[torch.Tensor]], keywords: list[Any], hidden: torch.Tensor) -> None:
        """Copy a layer's tensors and its call's inputs into the template's (keyword tensors only
        when they changed: every layer of a step reads the same position embeddings)."""
        with torch.no_grad():
            self.template.load(sources)
            self.hidden.copy_(hidden)
            for slot, (static, source) in enumerate(zip(self.keywords, keywords, strict=True)):
                if not isinstance(source, torch.Tensor):
                    continue
                loaded = self._loaded[slot]
                if loaded is None or loaded[0]() is not source or loaded[1] != source._version:
                    static.copy_(source)
                    self._loaded[slot] = (weakref.ref(source), source._version)


class LayerGraphs:
    """The model's captured layer calls, shared by the checkpoint functions of all its layers: one
    capture for each call shape, up to `limit` (rows padded to each batch's longest would capture
    one for every length); calls of further shapes run as they are."""

    def __init__(self, report: Callable[[str], None] = print, limit: int = 4) -> None:
        self.captures: dict[tuple[Any, ...], CapturedLayer] = {}
        self.limit = limit
        self.off: str | None = None  # why no graph serves this run
        self.replays = 0
        self.calls_of_other_shapes: collections.Counter[str] = collections.Counter()  # by what differed
        self._report = report
        self._template: _Template | None = None
        self._layers: weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[list[torch.Tensor]], list[torch.nn.Parameter]]] = (
            weakref.WeakKeyDictionary()
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerGraphs:
        return self  # a copied layer (the template) shares its original's graphs

    def wrap(self, function: Any, args: tuple[Any, ...]) -> Any:
        """`function`, a layer's call as transformers checkpoints it, as a replay of the graphs
        captured for its shape (captured now for a new shape, within `limit`); else itself."""
        if self.off is not None:
            return function
        signature = call_signature(function, args)
        if signature is None or not all(
            leaf.is_cuda for leaf in [args[0], *tree_flatten(function.keywords)[0]] if isinstance(leaf, torch.Tensor)
        ):
            return function
        layer = layer_call(function)[1]
        captured = self.captures.get(signature)
        if captured is None:
            if len(self.captures) >= self.limit:
                self.calls_of_other_shapes[_difference(next(iter(self.captures)), signature)] += 1
                return function
            try:
                why = not_graphable(layer)
                if why is not None:
                    raise NotGraphable(why)
                if self._template is None:
                    self._template = _Template(layer, self)
                captured = self.captures[signature] = CapturedLayer(self._template, function, args[0], signature)
            except (NotGraphable, RuntimeError) as error:  # the layers run as they are
                self.off = str(error).splitlines()[0]
                self._report(f"CUDA graphs off: {self.off}")
                return function
            self._report(f"CUDA graphs: captured {type(layer).__name__}'s forward and backward for hidden "
                         f"states {tuple(args[0].shape)}{f' ({_difference(next(iter(self.captures)), signature)})' if len(self.captures) > 1 else ''}; "
                         "every layer replays them")
        if layer not in self._layers:
            # Cached: training updates these tensors in place, and the copies read them as they are.
            self._layers[layer] = (by_dtype(layer_tensors(layer)), [p for p in layer.parameters() if p.requires_grad])
        sources, trainable = self._layers[layer]
        keywords = tree_flatten(function.keywords)[0]
        self.replays += 1

        def replay(hidden: torch.Tensor) -> torch.Tensor:
            return _Replay.apply(captured, sources, keywords, hidden, *trainable)

        return replay

    def describe(self) -> str:
        if self.off is not None:
            return f"CUDA graphs off ({self.off})"
        if not self.captures:
            return "CUDA graphs: no layer call captured"
        other = sum(self.calls_of_other_shapes.values())
        why = "; ".join(f"{count} with {what}" for what, count in self.calls_of_other_shapes.most_common(3))
        return (f"CUDA graphs: {len(self.captures)} call shape(s) captured, {self.replays} layer calls replayed, "
                f"{other} ran as they are{f' ({why})' if why else ''}; graph memory {graph_pool_bytes() / 2**30:.2f} GiB "
                "beyond its live tensors")


__all__ = ["CapturedLayer", "LayerGraphs", "NotGraphable", "by_dtype", "call_signature", "graph_pool_bytes", "layer_call", "layer_tensors",
           "not_graphable", "peak_memory_allocated", "reset_peak_memory"]
