"""Per-layer caches of a hybrid model, and committing a speculative window at any accepted length.

A KV layer keeps keys/values in a buffer grown in steps; rolling back is moving `offset`.
A GDN layer keeps the conv window (last kernel-1 projected inputs) and the fp32 recurrent state.

A speculative *window* starts with `begin_window()`; every token processed after that (in one or several
forwards) can be taken back: `commit(keep)` leaves each cache exactly as if only the first `keep` window
tokens had been processed. The model is never run again for this:
  - KV: offset = start + keep.
  - GDN conv: the window's inputs are kept, so the conv window ending at token keep-1 is a slice.
  - GDN state, two methods:
      "states" (default): the recurrence emits the state after every step and commit picks one (vLLM's way);
                for a window of one forward the pick and the conv window are slices (no copy, no launch),
                made for every keep while the device still verifies (`prepare_commit`);
      "replay": keep the step inputs (k, v, g, beta) and re-run `keep` recurrence steps from the state
                saved at the window start (MLX arrays are immutable: saving it costs nothing); less memory.
"""

import mlx.core as mx

from .models import kernels
from .models.gdn import replay_masked

COMMIT_METHODS = ("replay", "states")
# Measured on an H100 (8-layer Qwen3.5-35B-A3B bench, window of 5): a commit by views of the per-step states
# adds 0.01-0.03 ms to a round (prepared during the verify), replay 0.1-0.5 ms. "states" holds S fp32 states per
# GDN layer while a window is open (2 MiB per token per layer at Qwen3.5 size), replay 5.5x less: the choice for
# tight memory.
DEFAULT_COMMIT_METHOD = "states"


class KVCache:
    step = 256  # grow the buffer in chunks to avoid a copy per token

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0
        self._window_start = None

    def update_and_fetch(self, k, v):
        B, H, S, D = k.shape
        prev = self.offset
        if self.keys is None:
            self.keys = mx.zeros((B, H, 0, D), k.dtype)
            self.values = mx.zeros((B, H, 0, v.shape[3]), v.dtype)
        if prev + S > self.capacity:
            self.reserve(prev + S)
        self.offset += S
        self.keys[..., prev : self.offset, :] = k
        self.values[..., prev : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def mask(self, S: int):
        """The attention mask for S new queries over the keys update_and_fetch returned."""
        return "causal" if S > 1 else None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, n: int, double: bool = False):
        """Room for n positions, in whole steps; with `double` at least twice the current room, so that
        compiled steps (whose trace depends on the buffer's size) are retraced only a few times."""
        if n <= self.capacity:
            return
        size = -(-n // self.step) * self.step
        if double:
            size = max(size, 2 * self.capacity)

        def grown(buf):
            pad = mx.zeros((*buf.shape[:2], size - self.offset, buf.shape[3]), buf.dtype)
            return mx.concatenate([buf[..., : self.offset, :], pad], axis=2)

        self.keys, self.values = grown(self.keys), grown(self.values)

    def trim(self, n: int):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def begin_window(self):
        self._window_start = self.offset

    def commit(self, keep: int):
        self.offset = self._window_start + keep
        self._window_start = None

    @property
    def state(self):  # what the cache holds, for comparisons in tests
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class GDNCache:
    def __init__(self, method: str = DEFAULT_COMMIT_METHOD):
        if method not in COMMIT_METHODS:
            raise ValueError(f"commit method must be one of {COMMIT_METHODS}, got {method!r}")
        self.method = method
        self.conv_state = None  # [B, kernel-1, conv_dim]
        self.state = None  # [B, Hv, Dk, Dv] float32
        self.offset = 0
        self._window = None  # dict while a window is open
        self._retired = None  # the last window's arrays, let go of in prepare_commit (see _close_window)

    @property
    def wants_states(self) -> bool:
        return self._window is not None and self.method == "states"

    @property
    def wants_tape(self) -> bool:
        return self._window is not None and self.method == "replay"

    def begin_window(self):
        self._window = {"state": self.state, "conv_in": [], "tape": [], "states": [], "tokens": 0}

    def advance(self, conv_in, final_state, S: int, tape=None, states=None, conv_state=None):
        """Called by the GDN layer after each forward of S tokens with what it consumed and produced: the conv
        inputs (carried, then new), the final state, and what a commit needs (the recurrence inputs, or the
        per-step states). Outside a window conv_in may be None: the new conv state is then `conv_state`, the
        last kernel-1 conv inputs (S >= kernel-1)."""
        w = self._window
        if w is not None:
            w["kernel_1"] = conv_in.shape[1] - S
            w["tokens"] += S
            w["conv_in"].append(conv_in)
            if self.method == "states":
                w["states"].append(states)
            else:
                w["tape"].append(tape)
        self.conv_state = conv_in[:, S:] if conv_in is not None else conv_state
        self.state = final_state
        self.offset += S

    def commit(self, keep: int):
        commit_gdn([self], keep)

    def prepare_commit(self):
        """Host work of the coming commit done ahead: the engine calls this while the device runs the verify.
        Lets go of the last window's arrays, and for a window of one forward makes the picks of every keep, so
        that the commit is a lookup. (On an H100 host, 6 GDN layers: the slices cost ~15 us a commit, letting
        go of a window 60-75 us, against a round of ~3 ms.)"""
        self._retired = None
        w = self._window
        if w is not None and _one_forward(w):
            w["picks"] = [_pick(w, keep) for keep in range(w["tokens"])]

    def _close_window(self, keep: int):
        """End the window at `keep` tokens: the arrays the rewind needs, or None when everything is kept."""
        w, self._window = self._window, None
        # Freeing arrays costs host time (~1 us each on some GPU hosts), so the window and the arrays it replaces
        # stay until the next prepare_commit, when the device is busy: at most one window more is held.
        self._retired = (w, self.conv_state, self.state)
        processed = w["tokens"]
        if keep == processed:  # everything accepted: the cache is already there
            return None
        if not 0 <= keep < processed:
            raise ValueError(f"commit keeps {keep} of {processed} window tokens")
        self.offset -= processed - keep
        if _one_forward(w):
            self.conv_state, self.state = w["picks"][keep] if "picks" in w else _pick(w, keep)
            return None
        k1, forwards = w["kernel_1"], w["conv_in"]
        # the conv inputs from before the window through its last token
        history = forwards[0] if len(forwards) == 1 else mx.concatenate(
            [forwards[0]] + [c[:, k1:] for c in forwards[1:]], axis=1)
        cat = lambda parts: parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        if self.method == "states":
            extra = (cat(w["states"]),)
            B, _, H, Dk, Dv = extra[0].shape
        else:
            extra = tuple(cat(parts) for parts in zip(*w["tape"]))  # k, v, g, beta
            B, _, H, Dv = extra[1].shape
            Dk = extra[0].shape[-1]
        saved = w["state"] if w["state"] is not None else mx.zeros((B, H, Dk, Dv), mx.float32)
        return (history, saved) + extra


def _one_forward(w) -> bool:
    """A window of one forward (a verify) under "states": its commit is a pick of what that forward produced."""
    return len(w["states"]) == 1


def _pick(w, keep: int):
    """The conv window and the state after the first `keep` tokens of a one-forward window: slices of what the
    forward produced (views: no copy, no launch)."""
    k1, history, states = w["kernel_1"], w["conv_in"][0], w["states"][0]
    return history[:, keep : keep + k1], (states[:, keep - 1] if keep else w["state"])


def _rewind(keep, windows):
    """Per GDN layer, the conv window and state after the first `keep` window tokens (keep an array, so one
    trace serves every keep)."""
    out = []
    for history, saved, *extra in windows:
        B, L, C = history.shape
        k1 = L - extra[0].shape[1]  # history: the carried conv inputs, then the window's tokens
        conv_state = mx.slice(history, keep.reshape(1), axes=(1,), slice_size=(B, k1, C))
        if len(extra) == 1:  # "states": the state after step keep-1, or the saved one for keep = 0
            picked = mx.take(extra[0], mx.maximum(keep - 1, 0), axis=1)
            state = mx.where(keep > 0, picked, saved)
        else:
            state = replay_masked(*extra, saved, keep)
        out.append((conv_state, state))
    return out


_rewind_compiled = mx.compile(_rewind)


def commit_gdn(layers: list, keep: int):
    """Commit GDN layers' windows at `keep` tokens, all layers in one compiled call: a commit is on the path
    of every speculative round, and as separate small operations it would cost a dozen launches per layer."""
    windows = [c._close_window(keep) for c in layers]
    todo = [(c, w) for c, w in zip(layers, windows) if w is not None]
    if not todo:
        return
    kernels.prepare()  # the kernels' self-checks evaluate arrays: not inside a trace
    rewound = _rewind_compiled(mx.array(keep, mx.int32), [w for _, w in todo])
    for (c, _), (conv_state, state) in zip(todo, rewound):
        c.conv_state, c.state = conv_state, state


class ModelCache(list):
    """One cache per layer, in layer order; `model(tokens, cache)` reads and advances it."""

    def begin_window(self):
        for c in self:
            c.begin_window()

    def prepare_commit(self):
        for c in self:
            if isinstance(c, GDNCache):
                c.prepare_commit()

    def commit(self, keep: int):
        gdn = []
        for c in self:
            if isinstance(c, KVCache):
                c.commit(keep)
            else:
                gdn.append(c)
        commit_gdn(gdn, keep)

    @property
    def offset(self) -> int:
        return self[0].offset

    @property
    def filled(self) -> bool:
        """Every layer holds state (the prompt went in): what compiled steps need."""
        return all((c.keys if isinstance(c, KVCache) else c.state) is not None for c in self)

    def arrays(self) -> list:
        arrays = []
        for c in self:
            if isinstance(c, KVCache) and c.keys is not None:
                arrays += [c.keys, c.values]
            elif isinstance(c, GDNCache) and c.state is not None:
                arrays += [c.conv_state, c.state]
        return arrays

    def eval(self):
        mx.eval(self.arrays())


def make_cache(model, commit_method: str = DEFAULT_COMMIT_METHOD) -> ModelCache:
    return ModelCache(
        GDNCache(commit_method) if t == "linear_attention" else KVCache() for t in model.layer_types
    )
