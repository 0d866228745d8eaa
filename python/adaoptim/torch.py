"""Drop-in ``torch.optim`` optimizers whose step runs in adaoptim's Rust core.

Each class subclasses the ``torch.optim`` class of the same name, so its
constructor (signature, defaults, ``ValueError`` messages), ``param_groups``,
``add_param_group``, ``zero_grad``, ``state_dict``/``load_state_dict``, hooks
and ``torch.optim.lr_scheduler`` support are torch's own; only ``step`` is
replaced. State lives in torch tensors under torch's names and layout, so a
``state_dict`` moves between these classes and torch's in both directions.

``step()`` hands every parameter of every group to Rust in one call, which
updates parameters and state in place (zero copy, through the tensors' data
pointers) in one parallel region, with the GIL released. Every tensor is
checked first: a parameter, gradient or state tensor that is not on the CPU,
not contiguous or of a dtype the class does not step, or a gradient of
another shape, raises ``TypeError``/``ValueError`` naming the parameter
before anything is modified. From the second step on, a parameter whose
tensors are the ones checked before is not checked again in Python: the
per-parameter loop runs in Rust (``_core.step_cached``), and any change
sends the step back through the full checks.

DTensor parameters (FSDP2's ``fully_shard``) are stepped through each
rank's local shard, with DTensor state as torch creates it (the
element-wise classes with 32-bit state; the others refuse DTensors).

The element-wise classes step ``float32`` and ``bfloat16`` parameters and
state, and ``float32``, ``bfloat16`` or ``float16`` gradients (torch's
``grad_dtype`` lets a gradient's dtype differ from its parameter's). Half
precision values are widened, stepped in float32 and rounded back to
nearest-even in the same pass -- what torch's ``fused=True`` step does with
bfloat16 tensors. New state takes the parameter's dtype, as torch creates it; a
state tensor may be either dtype on its own (``float32`` state beside a
``bfloat16`` parameter keeps the moments exact). The row-sparse steps
(``SparseAdam``, ``Adagrad`` with sparse gradients) take ``float32`` or
``bfloat16`` embedding tables and state the same way.
Parameters whose ``.grad`` is ``None`` are skipped, as torch skips them.

The element-wise classes take three keyword-only options beyond torch's,
also attributes a loop may change between steps: ``grad_scale`` (a loss
scale divided out of every gradient), ``max_grad_norm`` (clipping by the
global L2 norm, torch's ``clip_grad_norm_`` factor) and ``skip_non_finite``
(a NaN or infinite gradient anywhere skips the whole step, as
``GradScaler`` skips it; ``last_step_skipped`` tells). They run inside the
one Rust pass: one read of the gradients for the norm, none written.
A fourth, ``bf16_stochastic_round`` (torchao's name for it; default
``False``), rounds ``bfloat16`` parameters stochastically instead of to
nearest, so updates smaller than half a bf16 ulp accumulate in expectation.
The random bits are the Rust core's counter-based stream, keyed by (a
per-group count of such steps, kept in the group as ``bf16_sr_step`` so a
``state_dict`` carries it; the parameter's index among those stepped in the
call; the step; the element), so the result is the same for any thread count
and a run resumed from a ``state_dict`` continues the same stream.

The classes that take a square root (``Adam``, ``AdamW``, ``RMSprop``,
``Adagrad``, ``Adadelta``, ``RAdam``, ``NAdam``) also take ``torch_exact=True``
(a group option, kept in ``param_groups``): the step is evaluated as torch's
single-tensor CPU path evaluates it (operation by operation, and with
torch's square root, which MKL computes: on AVX-512 one Newton step from
``vrsqrt14ps``, not correctly rounded), so the parameters and state equal
torch's bit for bit where torch's MKL takes its AVX-512 path. The others
give torch's bits without it. The default evaluation (one
division, correctly rounded roots) agrees within a few units in the last
place and is faster.

Two storage options, fixed at construction, take fewer bytes per parameter:

- ``optim_bits=8`` (bitsandbytes' name; ``min_8bit_size=4096`` as its):
  each state buffer of a parameter of at least ``min_8bit_size`` elements is
  8-bit block-wise (uint8 codes, a float32 absmax per block of 256,
  bitsandbytes' dynamic code map), smaller ones float32, in bitsandbytes'
  layout: ``state1``, ``state2``, ``absmax1``, ``absmax2``, ``qmap1``,
  ``qmap2`` and an integer ``step``, nested in ``state_dict`` under its key,
  so a state_dict moves between these classes and ``bitsandbytes.optim``'s
  8-bit ones both ways. A never-negative state of a one-state optimizer
  (RMSprop's ``square_avg``, Adagrad's ``sum``) gets the unsigned map,
  twice the resolution of the signed one bitsandbytes gives it; a loaded
  state keeps its own map (the two dynamic maps are taken).
- ``master_weights=True``: a ``bfloat16`` or ``float16`` parameter gets a
  float32 copy in its state (``master_param``), which the step updates;
  the parameter is written as the master rounded to nearest-even in the
  same pass. A parameter written in place since the last step (torch's
  version counter moved: ``model.load_state_dict``, ``p.copy_(...)``) or
  given new memory (``p.data = ...``) reseeds its master from its new
  value; a state_dict loaded into the optimizer brings its masters, which
  win. (``p.data.copy_(...)`` bypasses the version counter and goes unseen.)

``load_state_dict`` keeps these tensors' dtypes (torch casts state to the
parameter's) and converts between layouts: torch's named state loads into
an 8-bit optimizer (quantized), bitsandbytes' into a 32-bit one
(dequantized into torch's names).
"""

import json
import math
import re
import struct
from itertools import chain
from operator import is_ as _is

import torch

from . import _core

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Rprop",
    "ASGD",
    "Lion",
    "Adafactor",
    "SparseAdam",
    "Adam8bit",
    "AdamW8bit",
    "Lion8bit",
    "SGD8bit",
    "RMSprop8bit",
    "Adagrad8bit",
    "set_num_threads",
]

_STRIDE = _core.STRIDE
_MAX_STATE = _core.MAX_STATE
_MAX_AUX = _core.MAX_AUX
# torch options with no meaning for a CPU step that runs in Rust; True is refused.
_REFUSED_TRUE = ("differentiable", "capturable")
_F32 = torch.float32
_BF16 = torch.bfloat16
_F16 = torch.float16
# What the element-wise classes step: float32, or bfloat16 widened and
# stepped in float32 and rounded back to nearest-even in the same pass;
# gradients may also be float16 (torch's `grad_dtype` lets a gradient's
# dtype differ from its parameter's).
_DENSE_DTYPES = (_F32, _BF16)
_GRAD_DTYPES = (_F32, _BF16, _F16)
# The storage bits of the Rust call (python/src/lib.rs): parameter, gradient, state i.
_GRAD_BITS = {_F32: 0, _BF16: 2, _F16: 4}
_STATE_BITS = 3
_STRIDED = torch.strided
# The state of a parameter torch keeps none for (SGD without momentum): never written.
_NO_STATE = {}
# The per-tensor integers of 8-bit states and the parameter copy (absmax
# pointers, copy pointer), none in the plain step.
_NO_LOWBIT = [0] * (_MAX_STATE + 1)
# Where the step count given in place of a step tensor sits in a tensor's integers.
_STEP_GIVEN = 5 + _MAX_STATE
_Q8_BITS = _core.Q8_BITS
_UNSIGNED_BITS = _core.UNSIGNED_BITS
_COPY_BITS = {_BF16: _core.COPY_BF16, _F16: _core.COPY_F16}
_Q8_BLOCK = _core.Q8_BLOCK
_U8 = torch.uint8
# bitsandbytes' dynamic code maps, as `create_dynamic_map` builds them.
_SIGNED_MAP = torch.tensor(_core.q8_map(True), dtype=torch.float32)
_UNSIGNED_MAP = torch.tensor(_core.q8_map(False), dtype=torch.float32)
# Where bitsandbytes' state_dict puts its quantization tensors (hidden from FSDP's gather).
_BNB_WRAP = "__bnb_optimizer_quant_state__"
# State that keeps its dtype through load_state_dict (torch casts the rest to
# the parameter's dtype): bitsandbytes' quantization tensors, master weights.
_RAW_KEYS = re.compile(r"(state|absmax|qmap)\d+|master_param")
_BNB_KEYS = re.compile(r"(state|absmax|qmap)\d+")


def set_num_threads(n):
    """Threads every later step uses (0: one per core, rayon's default)."""
    _core.set_num_threads(int(n))


def _plain(v):
    if torch.is_tensor(v):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


_MISSING = object()
_FROZEN_TYPES = frozenset((float, int, bool, str, type(None), object))


def _frozen_key(v):
    """A hashable key of a group value that is immutable: a plain number,
    string or None (or the missing-key sentinel), or a tuple of those, with
    the types in the key (``1``, ``1.0`` and ``True`` are equal in Python
    but not to the option parser); None for anything else (a tensor)."""
    t = type(v)
    if t is tuple:
        if all(type(x) in _FROZEN_TYPES for x in v):
            return (t, v, tuple(map(type, v)))
        return None
    return (t, v) if t in _FROZEN_TYPES else None


def _where(i, gi):
    return f"parameter {i} of param_groups[{gi}]"


def _check_tensor(t, what, where, shape, dtypes=(torch.float32,)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {what} is not a tensor")
    if _is_dtensor(t):
        # The element-wise step passes DTensors' local parts here; the other
        # paths (Adafactor, SparseAdam, sparse Adagrad) do not take them.
        raise TypeError(f"{where}: {what} is a DTensor (FSDP2); this step does not take DTensors yet")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{where}: {what} is sparse; this optimizer takes dense gradients")
    if t.device.type != "cpu":
        raise TypeError(f"{where}: {what} is on {t.device}; adaoptim steps CPU tensors only")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{where}: {what} has dtype {t.dtype}; adaoptim steps {names} tensors here")
    if not t.is_contiguous():
        raise ValueError(f"{where}: {what} is not contiguous")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{where}: {what} has shape {tuple(t.shape)}, the parameter {tuple(shape)}")


try:
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # a torch without torch.distributed
    _DTensor = None


def _is_dtensor(t):
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t):
    """A DTensor's local part, else the tensor itself. FSDP2 (``fully_shard``)
    and tensor parallelism hand the optimizer DTensor parameters, gradients
    and (through ``zeros_like``) state: the step is element-wise, so each
    rank steps its own shard, in place, as torch's optimizers do through
    DTensor's dispatch."""
    return t._local_tensor if _is_dtensor(t) else t


def _check_placements(t, what, where):
    """A sharded or replicated DTensor steps as its local part; a pending
    reduction (a ``Partial`` placement) would not."""
    if _is_dtensor(t) and not all(pl.is_shard() or pl.is_replicate() for pl in t.placements):
        raise ValueError(
            f"{where}: {what} is a DTensor with placements {t.placements}; adaoptim steps Shard or Replicate ones"
        )


def _check_grad(p, g, where):
    _check_tensor(g, "its gradient", where, p.shape, _GRAD_DTYPES)


def _sparse_rows(p, g, where):
    """Checks a sparse COO gradient against its parameter (a float32 or
    bfloat16 table) and returns its elements per row, row indices (int64,
    over the sparse dimensions, row-major) and values, coalesced (by torch,
    in the gradient's dtype, as torch's own sparse steps coalesce) and
    contiguous, in the gradient's dtype (the Rust step widens them)."""
    _check_tensor(p, "the parameter", where, None, _DENSE_DTYPES)
    if g.shape != p.shape:
        raise ValueError(f"{where}: its gradient has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
    if g.device.type != "cpu" or g.dtype not in _GRAD_DTYPES:
        raise TypeError(
            f"{where}: its gradient must be a float32, bfloat16 or float16 CPU tensor, not {g.dtype} on {g.device}"
        )
    g = g.coalesce()
    sd = g.sparse_dim()
    idx, vals = g._indices(), g._values()
    dim = 1
    for d in p.shape[sd:]:
        dim *= d
    rows = torch.zeros(idx.shape[1], dtype=torch.int64)
    for k in range(sd):
        rows = rows * p.shape[k] + idx[k]
    rows = rows.contiguous()
    vals = vals.contiguous()
    n_rows = p.numel() // dim if dim else 0
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        raise ValueError(f"{where}: its gradient names a row outside the parameter's {n_rows} rows")
    return dim, rows, vals


def _sparse_bits(vals, *tensors):
    """The storage bits of a sparse step: bit i set when the i-th of the
    table and states is bfloat16 (the others are float32, checked before),
    bit 3 when the gradient's values are bfloat16, bit 4 when float16."""
    bits = sum(1 << i for i, t in enumerate(tensors) if t.dtype == _BF16)
    return bits | {_F32: 0, _BF16: 8, _F16: 16}[vals.dtype]


def _closure_loss(closure):
    """What ``step(closure)`` returns: the closure's loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _OwnGroups:
    """Construction and ``add_param_group`` for the classes with a step of
    their own (not `_RustStep`'s element-wise one): each group's torch
    keyword options are checked by the Rust core as JSON, at construction,
    when a group is added, and before every step."""

    _adaoptim_check = None  # the core's checker of this class's keyword JSON

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        for gi, group in enumerate(self.param_groups):
            self._adaoptim_options(group, gi)

    def _adaoptim_options(self, group, gi):
        _refuse_unsupported(group, gi)
        text = json.dumps(self._adaoptim_kwargs(group), sort_keys=True)
        type(self)._adaoptim_check(text)
        return text

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._adaoptim_options(self.param_groups[-1], len(self.param_groups) - 1)


def _refuse_unsupported(group, gi):
    for key in _REFUSED_TRUE:
        if group.get(key):
            raise ValueError(f"param_groups[{gi}]: {key}=True is not supported by adaoptim")


def _check_no_overlap(params):
    """Parameters must not overlap: they are written in parallel."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.element_size() * p.numel()) for p in params if p.numel())
    for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError("two parameters share memory; adaoptim writes them in parallel")


# adaoptim's keyword-only constructor options beyond torch's.
_OPTIONS = (
    "grad_scale",
    "max_grad_norm",
    "skip_non_finite",
    "bf16_stochastic_round",
    "optim_bits",
    "min_8bit_size",
    "master_weights",
)


class _RustStep:
    """The ``step`` shared by every class: collect, check, call Rust once."""

    _adaoptim_class = None  # the torch class name the Rust core knows

    def _adaoptim_setup(
        self,
        *,
        grad_scale=None,
        max_grad_norm=None,
        skip_non_finite=False,
        bf16_stochastic_round=False,
        optim_bits=32,
        min_8bit_size=4096,
        master_weights=False,
    ):
        # The fused controls (keyword-only constructor options beyond torch's,
        # attributes a training loop may change between steps): divide every
        # gradient by `grad_scale`, clip by the global norm `max_grad_norm`
        # (torch's `clip_grad_norm_` factor), skip the whole step when a
        # gradient is NaN or infinite (`skip_non_finite`, as GradScaler
        # skips it) -- all inside the one Rust pass.
        self.grad_scale = grad_scale
        self.max_grad_norm = max_grad_norm
        self.skip_non_finite = bool(skip_non_finite)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)
        self.last_step_skipped = False
        _check_controls(self)
        # The storage options (fixed at construction): 8-bit block-wise
        # state in bitsandbytes' layout, and float32 master weights for
        # half-precision parameters.
        if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
            raise ValueError(f"Invalid optim_bits: {optim_bits} (8 or 32)")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"Invalid min_8bit_size: {min_8bit_size} (an integer >= 0)")
        if master_weights and self.bf16_stochastic_round:
            raise ValueError(
                "master_weights and bf16_stochastic_round exclude each other "
                "(with master weights the bfloat16 parameter is a rounded copy)"
            )
        self.optim_bits = int(optim_bits)
        self.min_8bit_size = min_8bit_size
        self.master_weights = bool(master_weights)
        self._adaoptim_lowbit = self.optim_bits == 8 or self.master_weights
        if self._adaoptim_lowbit:
            # torch's Adagrad creates float32 `sum` at construction; the
            # first step creates this layout's state instead.
            self.state.clear()
        self._adaoptim_names = set(_core.option_names(self._adaoptim_class))
        self._adaoptim_sorted = tuple(sorted(self._adaoptim_names))
        self._adaoptim_by_values = {}
        self._adaoptim_layouts = {}
        for gi, group in enumerate(self.param_groups):
            self._adaoptim_options(group, gi)

    def _adaoptim_options(self, group, gi):
        _refuse_unsupported(group, gi)
        # The usual group holds plain Python numbers: its options' values
        # key the result directly (a tensor value, which may change in
        # place, always takes the full path).
        values = tuple(_frozen_key(group.get(k, _MISSING)) for k in self._adaoptim_sorted)
        if None in values:
            values = None
        else:
            hit = self._adaoptim_by_values.get(values)
            if hit is not None:
                return hit
        opts = {k: _plain(v) for k, v in group.items() if k in self._adaoptim_names}
        text = json.dumps(opts, sort_keys=True)
        if text not in self._adaoptim_layouts:
            if len(self._adaoptim_layouts) > 64:  # a schedule writes a new lr every step
                self._adaoptim_layouts.clear()
            # Validates (ValueError with the crate's message) and gives the layout.
            names, init, aux_names, aux_init = _core.layout(self._adaoptim_class, text)
            keys = tuple(names) + tuple(aux_names) + (("step",) if self._adaoptim_has_step else ())
            keys = self.__dict__.setdefault("_adaoptim_interned", {}).setdefault(keys, keys)
            self._adaoptim_layouts[text] = (names, init, aux_names, aux_init, keys)
        hit = text, self._adaoptim_layouts[text]
        if values is not None:
            if len(self._adaoptim_by_values) > 64:
                self._adaoptim_by_values.clear()
            self._adaoptim_by_values[values] = hit
        return hit

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_adaoptim_names"):
            self._adaoptim_options(self.param_groups[-1], len(self.param_groups) - 1)

    @torch.no_grad()
    def step(self, closure=None):
        if self._adaoptim_lowbit:
            return self._adaoptim_lowbit_step(closure)
        loss = _closure_loss(closure)
        cache = self.__dict__.setdefault("_adaoptim_cache", {})
        state_of = self.state.get
        if self.__dict__.get("_adaoptim_state_obj") is not self.state:
            # load_state_dict (or a user) replaced the state: rebuild the cache.
            cache.clear()
            self._adaoptim_state_obj = self.state
        elif cache and self._adaoptim_cached(cache, _check_controls(self)):
            # The usual step: every parameter with a gradient is cached.
            return loss
        self._adaoptim_unwrap()
        groups = []
        sparse = []  # (group index, options, p, g, where): parameters with sparse gradients
        pending = []  # (group slot, p, g, where, layout): checked, then given state, after the loop
        for gi, group in enumerate(self.param_groups):
            text, layout = self._adaoptim_options(group, gi)
            keys = layout[4]
            flat = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.layout is not _STRIDED and self._adaoptim_sparse is not None:
                    sparse.append((gi, text, p, g, _where(i, gi)))
                    continue
                # The tensors' own memory: a DTensor's local part.
                pl, gl = _local(p), _local(g)
                # The fast checks (torch itself keeps a gradient on its
                # parameter's device); the slow path names what is wrong.
                if not (gl.layout is _STRIDED and gl.dtype in _GRAD_DTYPES and gl.is_contiguous()):
                    _check_grad(pl, gl, _where(i, gi))
                entry = cache.get(id(p))
                # A cached parameter is stepped with its cached state tensors:
                # load_state_dict replaces the whole state (seen above); a
                # parameter's state dict replaced or deleted, or a state tensor
                # swapped by hand (any key), is seen by identity. A
                # parameter whose memory moved (`p.data = ...`), or whose
                # gradient has another size or dtype, goes through the full
                # checks again.
                ptr = pl.data_ptr()
                if (
                    entry is None
                    or entry[0] is not p
                    or entry[1] is not keys
                    or entry[6] != ptr
                    or gl.numel() != entry[3]
                    or gl.dtype is not entry[7]
                    or pl.dtype is not entry[8]
                    or entry[10] is not (gl is not g)
                    or state_of(p, _NO_STATE) is not entry[4]
                    or not all(map(_is, map(entry[4].get, keys), entry[5]))
                ):
                    pending.append((len(groups), p, g, _where(i, gi), layout))
                    continue
                flat.append(ptr)
                flat.append(gl.data_ptr())
                flat.extend(entry[2])
            groups.append((text, flat))
        # Every check (of both kinds of gradient) before anything changes.
        controls = _check_controls(self)
        if sparse and controls != (None, None, False):
            raise ValueError("grad_scale, max_grad_norm and skip_non_finite take dense gradients only")
        sparse_work = self._adaoptim_sparse_check(sparse) if sparse else None
        if pending:
            self._adaoptim_prepare(pending, groups, cache)
        self._adaoptim_run(groups, controls)
        if sparse_work:
            self._adaoptim_sparse_run(sparse_work)
        return loss

    # The class's step for sparse gradients, if it takes them (Adagrad).
    _adaoptim_sparse = None

    def _adaoptim_prepare(self, pending, groups, cache):
        """Checks, then creates state for and caches the parameters seen for
        the first time (or whose state was replaced, as load_state_dict does).
        A cache entry holds the parameter, the state keys, the per-tensor
        integers for the Rust call, the element count, the parameter's state
        dict, every state tensor (kept alive, so a cached pointer never
        dangles, and compared by identity), the parameter's data pointer, the
        gradient's and the parameter's dtypes (the storage bits depend on
        them), the tensor's integers packed as 64-bit native ones, the
        gradient pointer 0 (read by ``_core.step_cached``, which makes the
        same comparisons in Rust), and whether the parameter is a DTensor
        (pointers, sizes and dtypes are then its local part's)."""
        for _, p, g, where, layout in pending:
            names = layout[0]
            if _is_dtensor(p) != _is_dtensor(g):
                raise TypeError(f"{where}: the parameter and its gradient must both be DTensors or both not")
            _check_placements(p, "the parameter", where)
            _check_placements(g, "its gradient", where)
            _check_tensor(_local(p), "the parameter", where, None, _DENSE_DTYPES)
            _check_grad(_local(p), _local(g), where)
            st = self.state.get(p)
            if st:
                for n in names:
                    if st.get(n) is not None:
                        if _is_dtensor(st[n]) != _is_dtensor(p):
                            raise TypeError(f"{where}: state {n!r} must be a DTensor exactly when the parameter is")
                        _check_tensor(_local(st[n]), f"state {n!r}", where, _local(p).shape, _DENSE_DTYPES)
        _check_no_overlap(_local(p) for grp in self.param_groups for p in grp["params"])
        # Everything is checked: from here on, state is created.
        for slot, p, g, _, layout in pending:
            names, init, aux_names, aux_init, keys = layout
            # An optimizer without per-parameter state (SGD without momentum)
            # leaves torch's `state` empty, as torch does.
            st = self.state[p] if keys else _NO_STATE
            first = self._adaoptim_init_state(st, p, names, init, aux_names, aux_init)

            pl, gl = _local(p), _local(g)
            flat = groups[slot][1]
            flat.append(pl.data_ptr())
            flat.append(gl.data_ptr())
            flat.extend(self._adaoptim_integers(pl, gl, st, names, aux_names, 0 if first else 1))
            # Cached for the next steps (a step count of 1 for SGD's and Lion's
            # "not the first step"); every state tensor stays alive in it (a
            # DTensor state keeps its local part alive).
            held = tuple(st[k] for k in keys)
            ints = self._adaoptim_integers(pl, gl, st, names, aux_names, 1)
            packed = struct.pack(f"={_STRIDE}Q", pl.data_ptr(), 0, *ints)
            dtensor = pl is not p
            cache[id(p)] = (p, keys, ints, pl.numel(), st, held, pl.data_ptr(), gl.dtype, pl.dtype, packed, dtensor)

    def _adaoptim_integers(self, p, g, st, names, aux_names, given):
        """The per-tensor integers after the two data pointers (element count,
        state, step and scalar-state pointers); `given` is the step count of an
        optimizer torch keeps none for (SGD, Lion)."""
        bits = int(p.dtype is _BF16) | _GRAD_BITS[g.dtype]
        for i, n in enumerate(names):
            bits |= int(st[n].dtype is _BF16) << (_STATE_BITS + i)
        out = [p.numel(), bits] + [_local(st[n]).data_ptr() for n in names] + [0] * (_MAX_STATE - len(names))
        out += [st["step"].data_ptr(), 0] if self._adaoptim_has_step else [0, given]
        return out + [st[n].data_ptr() for n in aux_names] + [0] * (_MAX_AUX - len(aux_names)) + _NO_LOWBIT

    _adaoptim_has_step = True

    def _adaoptim_init_state(self, st, p, names, init, aux_names, aux_init):
        """Creates missing state as torch would; returns True on a first step."""
        first = len(st) == 0
        for n, v in zip(names, init):
            if st.get(n) is None:
                st[n] = torch.full_like(p, v, memory_format=torch.contiguous_format)
                first = True
        for n, v in zip(aux_names, aux_init):
            if n not in st or not _scalar_ok(st[n]):
                st[n] = torch.tensor(float(_plain(st.get(n, v))), dtype=torch.float32)
        if self._adaoptim_has_step and ("step" not in st or not _scalar_ok(st["step"])):
            st["step"] = torch.tensor(float(_plain(st.get("step", 0.0))), dtype=torch.float32)
        return first

    # ---- 8-bit states and master weights (`optim_bits=8`, `master_weights=True`) ----

    def _adaoptim_keys(self, names):
        """The state keys of the class's state buffers: bitsandbytes'
        ``state1``, ``state2``, ... with 8-bit states, torch's names otherwise."""
        if self.optim_bits == 8:
            return [f"state{i + 1}" for i in range(len(names))]
        return list(names)

    def _adaoptim_map(self, t, what, where):
        """Whether the code map `t` is bitsandbytes' unsigned dynamic map
        (False: the signed one); anything else is refused. Remembered per
        tensor and version, so an unchanged map is compared once."""
        maps = self.__dict__.setdefault("_adaoptim_maps", {})
        seen = maps.get(id(t))
        if seen is not None and seen[0] is t and seen[1] == t._version:
            return seen[2]
        _check_tensor(t, what, where, None)
        flat = t.reshape(-1)
        if flat.numel() == 256 and torch.equal(flat, _SIGNED_MAP):
            unsigned = False
        elif flat.numel() == 256 and torch.equal(flat, _UNSIGNED_MAP):
            unsigned = True
        else:
            raise ValueError(f"{where}: {what} is not bitsandbytes' signed or unsigned dynamic map")
        if len(maps) > 4096:
            maps.clear()
        maps[id(t)] = (t, t._version, unsigned)
        return unsigned

    def _adaoptim_lowbit_check(self, p, g, where, layout):
        """The checks of one parameter of the 8-bit/master step: its
        tensors and whatever state it has. Returns its step count."""
        if _is_dtensor(p) or _is_dtensor(g):
            raise TypeError(
                f"{where}: DTensor parameters (FSDP2) are not stepped with optim_bits=8 or master_weights yet"
            )
        dtypes = (_F32, _BF16, _F16) if self.master_weights else _DENSE_DTYPES
        _check_tensor(p, "the parameter", where, None, dtypes)
        _check_grad(p, g, where)
        st = self.state.get(p)
        if not st:
            return 0
        n = p.numel()
        for i, key in enumerate(self._adaoptim_keys(layout[0])):
            t = st.get(key)
            if t is None:
                continue
            if torch.is_tensor(t) and t.dtype is _U8:
                _check_tensor(t, f"state {key!r}", where, None, (_U8,))
                if t.numel() != n:
                    raise ValueError(f"{where}: state {key!r} has {t.numel()} codes, the parameter {n} elements")
                a, q = st.get(f"absmax{i + 1}"), st.get(f"qmap{i + 1}")
                if a is None or q is None:
                    raise ValueError(f"{where}: 8-bit state {key!r} has no 'absmax{i + 1}' and 'qmap{i + 1}'")
                _check_tensor(a, f"state 'absmax{i + 1}'", where, None)
                if a.numel() != -(-n // _Q8_BLOCK):
                    raise ValueError(
                        f"{where}: state 'absmax{i + 1}' has {a.numel()} entries, "
                        f"not one per 256 elements ({-(-n // _Q8_BLOCK)})"
                    )
                self._adaoptim_map(q, f"state 'qmap{i + 1}'", where)
            else:
                _check_tensor(t, f"state {key!r}", where, p.shape, _DENSE_DTYPES)
        for name in layout[2]:
            if name in st and not _scalar_ok(st[name]):
                raise TypeError(f"{where}: state {name!r} must be a 0-d float32 CPU tensor")
        m = st.get("master_param")
        if self.master_weights and p.dtype is not _F32 and m is not None:
            _check_tensor(m, "state 'master_param'", where, p.shape)
        step = _plain(st.get("step", 0))
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0 or not float(step).is_integer():
            raise ValueError(f"{where}: state 'step' is {step!r}, not a step count")
        return int(step)

    def _adaoptim_lowbit_state(self, st, p, layout):
        """Creates the state a parameter lacks: each state buffer (8-bit
        block-wise for a parameter of at least `min_8bit_size` elements with
        `optim_bits=8`, as bitsandbytes decides, else float32), scalar state,
        the step count, float32 master weights for a half-precision parameter."""
        names, init, aux_names, aux_init, _ = layout
        n = p.numel()
        q8 = self.optim_bits == 8 and n >= self.min_8bit_size
        for i, (name, key, v) in enumerate(zip(names, self._adaoptim_keys(names), init)):
            if st.get(key) is not None:
                continue
            if not q8:
                st[key] = torch.full(p.shape, v, dtype=_F32)
                continue
            codes = torch.zeros(p.shape, dtype=_U8)
            absmax = torch.zeros(-(-n // _Q8_BLOCK), dtype=_F32)
            signed = _core.q8_signed_for(name)
            if v != 0.0:
                src = torch.full((n,), v, dtype=_F32)
                _core.q8_quantize(src.data_ptr(), n, codes.data_ptr(), absmax.data_ptr(), not signed)
            st[key] = codes
            st[f"absmax{i + 1}"] = absmax
            # One map tensor per optimizer, shared by its parameters, as bitsandbytes shares them.
            st[f"qmap{i + 1}"] = self.__dict__.setdefault(
                "_adaoptim_qmaps", {True: _SIGNED_MAP.clone(), False: _UNSIGNED_MAP.clone()}
            )[signed]
        for name, v in zip(aux_names, aux_init):
            if name not in st:
                st[name] = torch.tensor(float(v), dtype=_F32)
        st.setdefault("step", 0)
        if self.master_weights and p.dtype is not _F32 and st.get("master_param") is None:
            st["master_param"] = p.detach().to(_F32, memory_format=torch.contiguous_format)

    def _adaoptim_lowbit_integers(self, p, g, st, layout, step):
        """The per-tensor integers of the Rust call (see python/src/lib.rs)."""
        names, _, aux_names, _, _ = layout
        master = st.get("master_param") if self.master_weights and p.dtype is not _F32 else None
        bits = _GRAD_BITS[g.dtype]
        if master is None:
            bits |= int(p.dtype is _BF16)
        else:
            bits |= _COPY_BITS[p.dtype]
        ptrs, absmax = [], []
        for i, key in enumerate(self._adaoptim_keys(names)):
            t = st[key]
            ptrs.append(t.data_ptr())
            if t.dtype is _U8:
                bits |= 1 << (_Q8_BITS + i)
                if self._adaoptim_map(st[f"qmap{i + 1}"], f"state 'qmap{i + 1}'", "?"):
                    bits |= 1 << (_UNSIGNED_BITS + i)
                absmax.append(st[f"absmax{i + 1}"].data_ptr())
            else:
                bits |= int(t.dtype is _BF16) << (_STATE_BITS + i)
                absmax.append(0)
        k = len(names)
        out = [master.data_ptr() if master is not None else p.data_ptr(), g.data_ptr(), p.numel(), bits]
        out += ptrs + [0] * (_MAX_STATE - k) + [0, step]
        out += [st[n].data_ptr() for n in aux_names] + [0] * (_MAX_AUX - len(aux_names))
        out += absmax + [0] * (_MAX_STATE - k)
        out.append(p.data_ptr() if master is not None else 0)
        return out

    def _adaoptim_lowbit_step(self, closure):
        """The step with 8-bit states or master weights: every parameter
        checked (its state included) before any state is created or any
        tensor written, then one Rust call, then the step counts.

        A parameter stepped before, whose state dict, state tensors (by
        identity; a code map also by version), data pointer, gradient
        size and dtypes are as then, reuses its checked integers (the
        plain step's cache, for this layout); any change sends it through
        the full checks again."""
        loss = _closure_loss(closure)
        controls = _check_controls(self)
        cache = self.__dict__.setdefault("_adaoptim_lowcache", {})
        written = self.__dict__.setdefault("_adaoptim_written", {})
        if self.__dict__.get("_adaoptim_low_state_obj") is not self.state:
            cache.clear()
            self._adaoptim_low_state_obj = self.state
        elif cache and self._adaoptim_cached(cache, controls, lowbit=(written, _F32)):
            # As the plain step; the bookkeeping after it is made in Rust too.
            return loss
        state_of = self.state.get
        todo = []
        fresh = False
        unwrapped = False
        for gi, group in enumerate(self.param_groups):
            text, layout = self._adaoptim_options(group, gi)
            keys = layout[4]
            items = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                e = cache.get(id(p))
                st = state_of(p)
                if (
                    e is not None
                    and e[0] is p
                    and e[1] is keys
                    and e[4] is st
                    and e[6] == p.data_ptr()
                    and g.layout is _STRIDED
                    and g.dtype is e[7]
                    and p.dtype is e[8]
                    and g.numel() == e[3]
                    and g.is_contiguous()
                    and all(map(_is, map(st.get, e[11]), e[5]))
                    and all(q._version == v for q, v in e[12])
                    and type(st.get("step")) is int
                    and st["step"] >= 0
                ):
                    items.append((p, g, st["step"], e))
                    continue
                if not unwrapped:
                    unwrapped = True
                    self._adaoptim_unwrap()
                    st = state_of(p)
                where = _where(i, gi)
                if g.layout is not _STRIDED:
                    raise TypeError(f"{where}: sparse gradients are not stepped with optim_bits=8 or master_weights")
                items.append((p, g, self._adaoptim_lowbit_check(p, g, where, layout), None))
                fresh = True
            todo.append((text, layout, items))
        if fresh:
            _check_no_overlap(p for grp in self.param_groups for p in grp["params"])
        groups, counted = [], []
        # Half-precision parameters as the last step left them (`written`:
        # object, version counter, data pointer): one written since (an
        # in-place copy such as `model.load_state_dict`, or `p.data = ...`)
        # reseeds its master from the new value.
        for text, layout, items in todo:
            flat = []
            for p, g, step, e in items:
                if e is None:
                    st = self.state[p]
                    self._adaoptim_lowbit_state(st, p, layout)
                    ints = self._adaoptim_lowbit_integers(p, g, st, layout, step)
                    used = tuple(k for k in st if k != "step")
                    maps = tuple((st[k], st[k]._version) for k in used if k.startswith("qmap"))
                    # The plain step's entry layout (see _adaoptim_prepare),
                    # then the state keys held and the code maps by version.
                    held = tuple(st[k] for k in used)
                    packed = struct.pack(f"={_STRIDE}Q", *ints)
                    e = (p, layout[4], ints, g.numel(), st, held, p.data_ptr(), g.dtype, p.dtype, packed, False)
                    e += (used, maps)
                    cache[id(p)] = e
                st = e[4]
                master = st.get("master_param") if p.dtype is not _F32 else None
                if master is not None:
                    seen = written.get(id(p))
                    if seen is not None and seen[0] is p and (seen[1] != p._version or seen[2] != p.data_ptr()):
                        master.copy_(p.detach().reshape(master.shape))
                ints = list(e[2])
                ints[1] = g.data_ptr()
                ints[_STEP_GIVEN] = step
                flat += ints
                counted.append((p, st, step, master is not None))
            groups.append((text, flat))
        ran = self._adaoptim_run(groups, controls)
        for p, st, step, has_master in counted:
            if has_master:
                written[id(p)] = (p, p._version, p.data_ptr())
            if ran:
                st["step"] = step + 1
        return loss

    def _adaoptim_cached(self, cache, controls, lowbit=None):
        """The step served from ``cache`` (the plain step's, or with
        ``lowbit`` the 8-bit/master one's): ``_core.step_cached`` makes the
        comparisons of the Python loop that follows a miss, in Rust, and
        steps. False when any parameter is not served from its entry:
        nothing has changed then, and the caller's loop runs, with its
        checks and messages."""
        groups = []
        for gi, group in enumerate(self.param_groups):
            text, layout = self._adaoptim_options(group, gi)
            groups.append((text, group["params"], layout[4]))
        extra = (cache, self.state, _NO_STATE, _STRIDED)
        return self._adaoptim_run(groups, controls, cached=extra, lowbit=lowbit) is not None

    def _adaoptim_run(self, groups, controls, cached=None, lowbit=None):
        """The one Rust call; counts the groups' stochastic-rounding steps.
        Returns whether the step ran (False: skipped for a non-finite
        gradient). With ``cached`` (the cache, the state, the no-state dict
        and torch.strided), ``_core.step_cached`` on its groups, which
        returns None when the cache could not serve the step (nothing
        changed, nothing counted)."""
        counts = None
        if self.bf16_stochastic_round:
            counts = [int(group.setdefault("bf16_sr_step", 0)) for group in self.param_groups]
        if cached is not None:
            ran = _core.step_cached(
                self._adaoptim_class, groups, *cached, *controls, stochastic_round=counts, lowbit=lowbit
            )
            if ran is None:
                return None
        else:
            ran = _core.step(self._adaoptim_class, groups, *controls, stochastic_round=counts)
        self.last_step_skipped = not ran
        if counts is not None and not self.last_step_skipped:
            for group in self.param_groups:
                group["bf16_sr_step"] += 1
        return not self.last_step_skipped

    def state_dict(self):
        """torch's ``state_dict``; with ``optim_bits=8`` the quantization
        tensors of each parameter (``state1``, ``absmax1``, ``qmap1``, ...)
        sit in a nested dict under bitsandbytes' key, as bitsandbytes'
        ``state_dict`` puts them (so FSDP's gather skips them)."""
        sd = super().state_dict()
        if self.optim_bits != 8:
            return sd
        # bitsandbytes' step reads `betas` and `eps` from every group: its
        # classes' values for this class's hyperparameters.
        groups = []
        for group in sd["param_groups"]:
            group = dict(group)
            for k, v in _bnb_group_keys(group).items():
                group.setdefault(k, v)
            groups.append(group)
        sd["param_groups"] = groups
        state = {}
        for k, v in sd["state"].items():
            v = dict(v)
            raw = {kk: v.pop(kk) for kk in list(v) if _BNB_KEYS.fullmatch(kk)}
            if raw:
                v[_BNB_WRAP] = raw
            state[k] = v
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``, which also takes bitsandbytes' 8-bit
        layout: its quantization tensors and float32 master weights keep
        their dtypes (torch would cast them to the parameter's). State in
        the other layout is converted: torch's named buffers are quantized
        into an ``optim_bits=8`` optimizer (``min_8bit_size`` decides, as at
        creation), bitsandbytes' states dequantized into a 32-bit one. On an
        error nothing changes."""
        sd = dict(state_dict)
        # A saved group missing one of this class's hyperparameters (one
        # saved by bitsandbytes has no `momentum`, say) keeps this
        # optimizer's value rather than falling back to a default.
        if len(sd["param_groups"]) == len(self.param_groups):
            sd["param_groups"] = [
                {**{k: v for k, v in ours.items() if k != "params"}, **saved}
                for ours, saved in zip(self.param_groups, sd["param_groups"])
            ]
        held = {}
        states = {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict):
                v = dict(v)
                if isinstance(v.get(_BNB_WRAP), dict):
                    v.update(v.pop(_BNB_WRAP))
                raw = {kk: v.pop(kk) for kk in list(v) if _RAW_KEYS.fullmatch(kk)}
                if raw:
                    held[k] = raw
            states[k] = v
        sd["state"] = states
        old = (self.state, self.param_groups)
        super().load_state_dict(sd)
        # A loaded master is the truth, whatever the parameters hold.
        self.__dict__.pop("_adaoptim_written", None)
        try:
            saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
            ours = chain.from_iterable(g["params"] for g in self.param_groups)
            id_map = dict(zip(saved, ours))
            for k, raw in held.items():
                if k in id_map:
                    st = self.state[id_map[k]]
                    for kk, t in raw.items():
                        st[kk] = t.detach().clone() if torch.is_tensor(t) else t
            self._adaoptim_convert()
        except Exception:
            self.__setstate__({"state": old[0], "param_groups": old[1]})
            raise

    def _adaoptim_unwrap(self):
        """State written straight into ``state``, past ``load_state_dict``
        (``ZeroRedundancyOptimizer.load_state_dict`` assigns each parameter's
        saved dict so), may hold bitsandbytes' nesting or the other layout:
        unnest it and convert it as ``load_state_dict`` would."""
        found = False
        for st in self.state.values():
            if isinstance(st, dict) and isinstance(st.get(_BNB_WRAP), dict):
                st.update(st.pop(_BNB_WRAP))
                found = True
        if found:
            self._adaoptim_convert()

    def _adaoptim_convert(self):
        """Brings every parameter's state to this optimizer's layout (see
        ``load_state_dict``); checks everything before converting anything."""
        work = []
        for gi, group in enumerate(self.param_groups):
            _, layout = self._adaoptim_options(group, gi)
            names = layout[0]
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                where = _where(i, gi)
                bnb = [f"state{j + 1}" for j in range(len(names))]
                if self.optim_bits == 8 and all(st.get(n) is not None for n in names):
                    for n in names:
                        _check_tensor(st[n], f"state {n!r}", where, p.shape, _DENSE_DTYPES)
                    work.append(("quantize", p, st, layout))
                elif self.optim_bits != 8 and all(st.get(n) is not None for n in bnb):
                    for j, n in enumerate(bnb):
                        t = st[n]
                        if torch.is_tensor(t) and t.dtype is _U8:
                            _check_tensor(t, f"state {n!r}", where, None, (_U8,))
                            a = st.get(f"absmax{j + 1}")
                            if t.numel() != p.numel() or a is None or a.numel() != -(-p.numel() // _Q8_BLOCK):
                                raise ValueError(f"{where}: 8-bit state {n!r} does not fit the parameter")
                            _check_tensor(a, f"state 'absmax{j + 1}'", where, None)
                            self._adaoptim_map(st.get(f"qmap{j + 1}"), f"state 'qmap{j + 1}'", where)
                        else:
                            _check_tensor(t, f"state {n!r}", where, p.shape, _DENSE_DTYPES)
                    work.append(("dequantize", p, st, layout))
        for what, p, st, layout in work:
            names = layout[0]
            if what == "quantize":
                src = {n: st.pop(n) for n in names}
                self._adaoptim_lowbit_state(st, p, layout)
                for i, n in enumerate(names):
                    t = st[f"state{i + 1}"]
                    v = src[n].to(_F32).contiguous()
                    if t.dtype is _U8:
                        unsigned = self._adaoptim_map(st[f"qmap{i + 1}"], "qmap", "?")
                        _core.q8_quantize(
                            v.data_ptr(), p.numel(), t.data_ptr(), st[f"absmax{i + 1}"].data_ptr(), unsigned
                        )
                    else:
                        t.copy_(v.reshape(t.shape))
            else:
                for i, n in enumerate(names):
                    t = st.pop(f"state{i + 1}")
                    a, q = st.pop(f"absmax{i + 1}", None), st.pop(f"qmap{i + 1}", None)
                    if t.dtype is _U8:
                        out = torch.empty(p.shape, dtype=_F32)
                        _core.q8_dequantize(
                            t.data_ptr(), a.data_ptr(), p.numel(), out.data_ptr(), self._adaoptim_map(q, "qmap", "?")
                        )
                        t = out
                    st[n] = t.to(_F32 if self.master_weights or p.dtype not in _DENSE_DTYPES else p.dtype)
        if self._adaoptim_lowbit:
            for st in self.state.values():
                if "step" in st and torch.is_tensor(st["step"]):
                    st["step"] = int(_plain(st["step"]))


def _bnb_group_keys(group):
    """The `betas` and `eps` bitsandbytes' 8-bit classes keep in a group,
    from torch's hyperparameters (SGD8bit: (momentum, dampening); RMSprop8bit:
    (alpha, momentum); Adagrad8bit: (0, 0); Lion8bit: eps 0)."""
    if "momentum" in group and "alpha" in group:
        return {"betas": (group["alpha"], group["momentum"])}
    if "momentum" in group:
        return {"betas": (group["momentum"], group.get("dampening", 0.0)), "eps": 0.0}
    if "lr_decay" in group:
        return {"betas": (0.0, 0.0)}
    return {"eps": 0.0}


def _check_controls(opt):
    """The fused controls of `opt`, checked: (grad_scale, max_grad_norm, skip_non_finite)."""
    scale, norm = opt.grad_scale, opt.max_grad_norm
    if scale is not None:
        scale = float(_plain(scale))
        if not (math.isfinite(scale) and scale != 0.0):
            raise ValueError(f"Invalid grad_scale: {scale} (finite and nonzero)")
    if norm is not None:
        norm = float(_plain(norm))
        if not (math.isfinite(norm) and norm > 0.0):
            raise ValueError(f"Invalid max_grad_norm: {norm} (finite and > 0)")
    return scale, norm, bool(opt.skip_non_finite)


def _scalar_ok(s):
    return (
        torch.is_tensor(s) and s.dtype == torch.float32 and s.device.type == "cpu" and s.numel() == 1 and s.dim() == 0
    )


def _make(base, class_name, doc_extra=""):
    cls = type(
        base.__name__,
        (_RustStep, base),
        {
            "_adaoptim_class": class_name,
            "__doc__": f"``torch.optim.{base.__name__}`` with its step in adaoptim's Rust core.{doc_extra}",
            "__module__": __name__,
        },
    )

    def __init__(self, params, *args, **kwargs):
        # adaoptim's keyword-only options (see `_RustStep._adaoptim_setup`), the rest torch's.
        ours = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        # `torch_exact` (the classes that take a square root): a group option
        # of the Rust core's, kept in `param_groups` (a group dict may set its own).
        exact = kwargs.pop("torch_exact", None)
        if exact is not None and "torch_exact" not in _core.option_names(class_name):
            raise TypeError(f"{base.__name__}.__init__() got an unexpected keyword argument 'torch_exact'")
        if exact is not None and not isinstance(exact, bool):
            raise TypeError(f"torch_exact must be True or False, not {exact!r}")
        base.__init__(self, params, *args, **kwargs)
        if exact is not None:
            self.defaults["torch_exact"] = exact
            for group in self.param_groups:
                group.setdefault("torch_exact", exact)
        self._adaoptim_setup(**ours)

    __init__.__doc__ = base.__init__.__doc__
    cls.__init__ = __init__
    return cls


SGD = _make(torch.optim.SGD, "SGD")
SGD._adaoptim_has_step = False  # torch's SGD state is momentum_buffer alone
_TORCH_EXACT_DOC = (
    "\n\n    ``torch_exact=True`` (keyword, also a per-group option) evaluates the\n"
    "    step as torch's single-tensor CPU path does, square roots included\n"
    "    (torch's come from MKL and are not correctly rounded), for torch's\n"
    "    exact bits where torch's MKL takes its AVX-512 path; the default\n"
    "    evaluation agrees within a few units in the last place and is faster."
)
Adagrad = _make(
    torch.optim.Adagrad,
    "Adagrad",
    "\n\n    Sparse COO gradients (an ``nn.Embedding(..., sparse=True)`` gives them)\n"
    "    take torch's sparse update: only the rows they name change (their\n"
    "    ``sum`` and values), with the step's decayed lr; ``weight_decay`` must be\n"
    "    0 then, as in torch, and ``torch_exact`` False. Dense and sparse\n"
    "    gradients mix in one step." + _TORCH_EXACT_DOC,
)


def _adagrad_sparse_check(self, sparse):
    """Checks the parameters with sparse gradients (options, tensors, rows,
    state); returns their work for ``_adaoptim_sparse_run``."""
    by_group = {}
    for gi, text, p, g, where in sparse:
        if gi not in by_group:
            _core.sparse_adagrad_check(text)
            by_group[gi] = (text, [])
        dim, rows, vals = _sparse_rows(p, g, where)
        st = self.state.get(p)
        if not st or "sum" not in st or "step" not in st:
            raise ValueError(f"{where}: state has no 'sum' and 'step' (torch's Adagrad creates them)")
        _check_tensor(st["sum"], "state 'sum'", where, p.shape, _DENSE_DTYPES)
        if not _scalar_ok(st["step"]):
            raise TypeError(f"{where}: state 'step' must be a 0-d float32 CPU tensor")
        by_group[gi][1].append((p, dim, rows, vals, st))
    _check_no_overlap(p for grp in self.param_groups for p in grp["params"])
    return list(by_group.values())


def _adagrad_sparse_run(self, work):
    groups, keep, counted = [], [], []
    for text, items in work:
        tensors = []
        for p, dim, rows, vals, st in items:
            t = int(st["step"].item()) + 1
            ptrs = [p.data_ptr(), st["sum"].data_ptr(), 0]
            bits = _sparse_bits(vals, p, st["sum"])
            tensors.append((dim, p.numel(), ptrs, t, rows.data_ptr(), rows.numel(), vals.data_ptr(), bits))
            keep.append((rows, vals))
            counted.append((st, t))
        groups.append((text, tensors))
    _core.sparse_adagrad_step(groups)
    for st, t in counted:
        st["step"].fill_(float(t))


Adagrad._adaoptim_sparse = True
Adagrad._adaoptim_sparse_check = _adagrad_sparse_check
Adagrad._adaoptim_sparse_run = _adagrad_sparse_run
RMSprop = _make(torch.optim.RMSprop, "RMSprop", _TORCH_EXACT_DOC)
Adadelta = _make(torch.optim.Adadelta, "Adadelta", _TORCH_EXACT_DOC)
Adam = _make(torch.optim.Adam, "Adam", _TORCH_EXACT_DOC)
AdamW = _make(torch.optim.AdamW, "AdamW", _TORCH_EXACT_DOC)
Adamax = _make(torch.optim.Adamax, "Adamax")
NAdam = _make(torch.optim.NAdam, "NAdam", _TORCH_EXACT_DOC)
RAdam = _make(torch.optim.RAdam, "RAdam", _TORCH_EXACT_DOC)
Rprop = _make(torch.optim.Rprop, "Rprop")
ASGD = _make(torch.optim.ASGD, "ASGD")


class Lion(_RustStep, torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with ``lion_pytorch.Lion``'s names and defaults."""

    _adaoptim_class = "Lion"
    _adaoptim_has_step = False  # lion-pytorch keeps exp_avg alone

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0.0,
        **options,
    ):
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Invalid beta parameters: {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self._adaoptim_setup(**options)


# Adafactor's storages, in the order of the Rust side's dtype codes.
_ADAFACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Adafactor(_OwnGroups, torch.optim.Adafactor):
    """``torch.optim.Adafactor`` with its step in adaoptim's Rust core.

    Constructor, ``param_groups``, ``state_dict`` and schedulers are torch's;
    the state is torch's (``step``, ``row_var``/``col_var`` for parameters of
    two or more dimensions, ``variance`` for vectors), so state dicts move
    between this class and torch's both ways. One Rust call steps every
    tensor (side by side, each also split inside), the GIL released. Checked before anything changes:
    every tensor CPU, contiguous, of the parameter's shape.

    Parameters may be float32, bfloat16 or float16; each one's gradient and
    state take its dtype, as torch creates them. A half-precision tensor is
    widened exactly, stepped in float32 and rounded back to nearest even,
    its state too (torch instead rounds every intermediate to the
    parameter's dtype).

    The fused controls of the element-wise classes, keyword-only and
    attributes a loop may change between steps: ``grad_scale`` (a loss scale
    divided out of every gradient), ``max_grad_norm`` (clipping by the global
    L2 norm over every gradient, torch's ``clip_grad_norm_`` factor) and
    ``skip_non_finite`` (a NaN or infinite gradient anywhere skips the whole
    step; ``last_step_skipped`` tells). They run inside the one Rust call;
    the caller's gradients are not written. ``bf16_stochastic_round=True``
    rounds ``bfloat16`` parameters stochastically instead of to nearest,
    with the stream and keys of the element-wise classes (the group's
    ``bf16_sr_step`` count, the tensor's index among those stepped in the
    call, its step); the state still rounds to nearest.
    """

    _adaoptim_check = _core.adafactor_check

    def __init__(
        self,
        params,
        *args,
        grad_scale=None,
        max_grad_norm=None,
        skip_non_finite=False,
        bf16_stochastic_round=False,
        **kwargs,
    ):
        super().__init__(params, *args, **kwargs)
        self.grad_scale = grad_scale
        self.max_grad_norm = max_grad_norm
        self.skip_non_finite = bool(skip_non_finite)
        self.bf16_stochastic_round = bool(bf16_stochastic_round)
        self.last_step_skipped = False
        _check_controls(self)

    @staticmethod
    def _adaoptim_kwargs(group):
        eps = _plain(group["eps"])
        return {
            "lr": _plain(group["lr"]),
            "beta2_decay": _plain(group["beta2_decay"]),
            "eps": [eps[0], eps[1]],
            "d": _plain(group["d"]),
            "weight_decay": _plain(group["weight_decay"]),
            "maximize": bool(group["maximize"]),
        }

    @staticmethod
    def _adaoptim_state_shapes(p):
        if p.dim() > 1:
            row, col = list(p.shape), list(p.shape)
            row[-1] = 1
            col[-2] = 1
            return {"row_var": torch.Size(row), "col_var": torch.Size(col)}
        return {"variance": p.shape}

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        # Check everything first: nothing (state included) is created or
        # modified when a check fails.
        controls = _check_controls(self)
        todo = []
        for gi, group in enumerate(self.param_groups):
            text = self._adaoptim_options(group, gi)
            items = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = _where(i, gi)
                _check_tensor(p, "the parameter", where, None, _ADAFACTOR_DTYPES)
                _check_tensor(p.grad, "its gradient", where, p.shape, (p.dtype,))
                st = self.state.get(p)
                shapes = self._adaoptim_state_shapes(p)
                if st:
                    for name, shape in shapes.items():
                        if name not in st:
                            raise ValueError(f"{where}: state has no {name!r} (a state of another shape?)")
                        _check_tensor(st[name], f"state {name!r}", where, shape, (p.dtype,))
                    step = st.get("step")
                    if not _scalar_ok(step):
                        raise TypeError(f"{where}: state 'step' must be a 0-d float32 CPU tensor")
                items.append((p, shapes))
            todo.append((text, items))
        _check_no_overlap(p for _, items in todo for p, _ in items)
        groups = []
        created = []
        for text, items in todo:
            tensors = []
            for p, shapes in items:
                st = self.state[p]
                if len(st) == 0:
                    # As torch's _init_group creates it.
                    created.append(p)
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for name, shape in shapes.items():
                        st[name] = torch.zeros(shape, dtype=p.dtype)
                ptrs = [p.data_ptr(), p.grad.data_ptr()]
                for name in ("row_var", "col_var", "variance"):
                    ptrs.append(st[name].data_ptr() if name in shapes else 0)
                ptrs.append(st["step"].data_ptr())
                tensors.append((list(p.shape), ptrs, _ADAFACTOR_DTYPES.index(p.dtype)))
            groups.append((text, tensors))
        counts = None
        if self.bf16_stochastic_round:
            counts = [int(group.setdefault("bf16_sr_step", 0)) for group in self.param_groups]
        self.last_step_skipped = not _core.adafactor_step(groups, *controls, stochastic_round=counts)
        if counts is not None and not self.last_step_skipped:
            for group in self.param_groups:
                group["bf16_sr_step"] += 1
        if self.last_step_skipped:
            # A skipped step leaves no trace, not even a first step's state.
            for p in created:
                del self.state[p]
        return loss


class SparseAdam(_OwnGroups, torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with its step in adaoptim's Rust core.

    Constructor, ``param_groups``, ``state_dict`` and state (``step``,
    ``exp_avg``, ``exp_avg_sq``) are torch's, so state dicts move between
    this class and torch's both ways. Gradients are sparse COO tensors (an
    ``nn.Embedding(..., sparse=True)`` gives them); the rows they name update
    their moments and values, the others keep theirs (torch's lazy update).
    One Rust call steps every parameter, the GIL released; everything is
    checked first (CPU contiguous parameters and state, a sparse gradient
    of the parameter's shape, row indices in range), and a failed check
    changes nothing.

    Tables and state are float32 or bfloat16 (each tensor either; new state
    takes the table's dtype, as torch creates it), gradients float32,
    bfloat16 or float16. A bfloat16 row is stepped in float32 and each
    tensor rounded to nearest once (torch's bfloat16 step rounds after every
    operation): the float32 step on the widened rows, rounded.
    """

    _adaoptim_check = _core.sparse_adam_check

    @staticmethod
    def _adaoptim_kwargs(group):
        return {
            "lr": _plain(group["lr"]),
            "betas": _plain(list(group["betas"])),
            "eps": _plain(group["eps"]),
            "maximize": bool(group.get("maximize", False)),
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        todo = []
        for gi, group in enumerate(self.param_groups):
            text = self._adaoptim_options(group, gi)
            items = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                where = _where(i, gi)
                if not g.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                dim, rows, vals = _sparse_rows(p, g, where)
                st = self.state.get(p)
                if st:
                    for name in ("exp_avg", "exp_avg_sq"):
                        if name not in st:
                            raise ValueError(f"{where}: state has no {name!r}")
                        _check_tensor(st[name], f"state {name!r}", where, p.shape, _DENSE_DTYPES)
                    step = _plain(st.get("step", 0))
                    if not float(step).is_integer() or step < 0:
                        raise ValueError(f"{where}: state 'step' is {step}, not a step count")
                items.append((p, dim, rows, vals))
            todo.append((text, items))
        _check_no_overlap(p for _, items in todo for p, *_ in items)
        groups, keep, counted = [], [], []
        for text, items in todo:
            tensors = []
            for p, dim, rows, vals in items:
                st = self.state[p]
                if len(st) == 0:
                    # As torch's step creates it.
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t = int(_plain(st["step"])) + 1
                ptrs = [p.data_ptr(), st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()]
                bits = _sparse_bits(vals, p, st["exp_avg"], st["exp_avg_sq"])
                tensors.append((dim, p.numel(), ptrs, t, rows.data_ptr(), rows.numel(), vals.data_ptr(), bits))
                keep.append((rows, vals))
                counted.append((st, t))
            groups.append((text, tensors))
        _core.sparse_adam_step(groups)
        for st, t in counted:
            st["step"] = t
        return loss


def _make_8bit(base, name):
    """``base`` with ``optim_bits=8``, under bitsandbytes' class name; takes
    the bitsandbytes options that mean what adaoptim does
    (``min_8bit_size``, ``block_wise=True``, ``percentile_clipping=100``,
    ``is_paged=False``, ``optim_bits=8``) and refuses the others' values."""

    def __init__(
        self,
        params,
        *args,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        is_paged=False,
        optim_bits=8,
        **kwargs,
    ):
        if percentile_clipping != 100:
            raise ValueError(f"{name}: percentile_clipping={percentile_clipping} is not supported (100: off)")
        if not block_wise:
            raise ValueError(f"{name}: block_wise=False is not supported (the states are block-wise)")
        if is_paged:
            raise ValueError(f"{name}: is_paged=True is not supported (paged memory is a GPU feature)")
        if optim_bits != 8:
            raise ValueError(f"{name}: optim_bits={optim_bits}; use {base.__name__} for 32-bit states")
        base.__init__(self, params, *args, optim_bits=8, min_8bit_size=min_8bit_size, **kwargs)

    doc = (
        f"``{base.__name__}(..., optim_bits=8)`` under bitsandbytes' name ``bitsandbytes.optim.{name}``:\n"
        "8-bit block-wise states in bitsandbytes' state_dict layout (see the module docs).\n"
        f"The constructor is ``{base.__name__}``'s (torch's signature and defaults), plus bitsandbytes'\n"
        "``min_8bit_size=4096``; ``block_wise=True``, ``percentile_clipping=100`` and\n"
        "``is_paged=False`` are accepted, other values refused."
    )
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


Adam8bit = _make_8bit(Adam, "Adam8bit")
AdamW8bit = _make_8bit(AdamW, "AdamW8bit")
Lion8bit = _make_8bit(Lion, "Lion8bit")
SGD8bit = _make_8bit(SGD, "SGD8bit")
RMSprop8bit = _make_8bit(RMSprop, "RMSprop8bit")
Adagrad8bit = _make_8bit(Adagrad, "Adagrad8bit")
