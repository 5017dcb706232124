"""Host-side numpy replay memory for a vectorised actor, uniform or proportional-prioritized.

Storage
    Every one of the `num_envs` environment streams owns a ring buffer of
    `capacity_per_env = capacity // num_envs` slots. A slot holds ONE observation: its newest frame
    (`frame_shape`, `frame_dtype`), the action taken at it, the reward received on arriving at it,
    and a uint8 flags field (FIRST, TERMINATED, TRUNCATED). Stacked observations and n-step
    returns are rebuilt at sample time, so an Atari transition costs one 84x84 frame plus 6 bytes
    (plus the priority trees when prioritized).

Time
    All streams advance in lockstep: the k-th call to `add` (k = 0, 1, ...) writes "time" k into
    slot k % capacity_per_env of every env. With A adds made so far the slots hold times
    max(0, A - capacity_per_env) .. A - 1.

Valid sample starts
    A start at time t of env e is valid iff
      * t + n_step <= A - 1 (the whole n-step lookahead is written),
      * t - (stack_size - 1) >= A - capacity_per_env once the ring has wrapped (the stack's
        history is not overwritten; before wrapping, time 0 is FIRST so no history is missing),
      * slot t is not a last observation (neither TERMINATED nor TRUNCATED).
    The first two conditions give the same time window [low, high] for all envs; it only moves
    forward, so on each `add` the times entering and leaving the window are a handful of
    contiguous times (in steady state exactly one of each, i.e. num_envs slots enter and num_envs
    slots leave). The count of valid starts and (for prioritized replay) the tree priorities are
    updated incrementally from those slots: entering non-last slots get the current max priority,
    leaving slots get priority 0, so a slot has non-zero priority exactly while it is a valid start.

Transitions
    For a start t the walk i = 1..n_step stops at the first slot t+j that is a last observation.
    `rewards[i-1]` is the reward of slot t+i for i <= j and 0 after; `discounts[i-1]` is 0 if slot
    t+i is TERMINATED, else gamma, for i <= j, and 1 after. `obs_tm1` is the stack at t and `obs_t`
    the stack at t+j. A stack at time u is frames u-stack_size+1 .. u of the same env along axis 1,
    where every position before the episode's FIRST slot repeats the first frame (like envpool's
    reset stack). The learner's target is
    sum_i prod_{k<i} discounts_k * rewards_i + prod_all(discounts) * Q(obs_t).

Episode bookkeeping
    The first `add` must mark every env FIRST. If `add` marks an env FIRST while its previous
    observation was neither TERMINATED nor TRUNCATED (an episode abandoned mid-way, e.g. a manual
    reset), the previous observation is marked TRUNCATED so no transition crosses the boundary.

Indices are flat int64 `env * capacity_per_env + slot`; `update_priorities` ignores indices that
stopped being valid starts since they were sampled. `obs_tm1` and `obs_t` of one batch are two
contiguous halves of one array (a single gather). Everything is vectorised over the batch; the
class is not thread-safe (guard it with a lock if an actor and a learner thread share it).
"""

from typing import NamedTuple

import numpy as np
import psutil

from gorila_jax.core.sum_tree import SumTree

__all__ = [
    "FIRST",
    "TERMINATED",
    "TRUNCATED",
    "PrioritizedReplay",
    "Replay",
    "Sample",
    "Transition",
    "check_fits_in_memory",
]

FIRST = np.uint8(1)
TERMINATED = np.uint8(2)
TRUNCATED = np.uint8(4)
LAST_OBS = np.uint8(TERMINATED | TRUNCATED)
_ALL_FLAGS = FIRST | TERMINATED | TRUNCATED
# Adds a saved replay may claim (far beyond any run; keeps index arithmetic in int64).
MAX_ADDS = 2**62
# Rejection rounds for uniform sampling before falling back to enumerating the valid starts.
_MAX_REJECTION_ROUNDS = 32


class Transition(NamedTuple):
    """A batch of n-step transitions, batch dimension first."""

    obs_tm1: np.ndarray  # (B, stack_size, *frame_shape), frame_dtype
    action_tm1: np.ndarray  # (B,) int32
    rewards: np.ndarray  # (B, n_step) float32
    discounts: np.ndarray  # (B, n_step) float32
    obs_t: np.ndarray  # (B, stack_size, *frame_shape), frame_dtype


class Sample(NamedTuple):
    """A sampled batch with its flat indices and importance weights."""

    transition: Transition
    indices: np.ndarray  # (B,) int64, env * capacity_per_env + slot
    weights: np.ndarray  # (B,) float32; all ones for uniform replay


def check_fits_in_memory(bytes_needed: int, capacity: int, frame_bytes: int) -> None:
    """Raise MemoryError if `bytes_needed` exceeds the memory available right now."""
    available = psutil.virtual_memory().available
    if bytes_needed > available:
        raise MemoryError(
            f"replay needs {bytes_needed / 1e9:.1f} GB (capacity={capacity} transitions of "
            f"{frame_bytes}-byte frames) but only {available / 1e9:.1f} GB is available; "
            "lower replay_capacity"
        )


def _allocate_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Allocate one zero-filled storage array (a separate function so tests can watch it)."""
    return np.zeros(shape, dtype=dtype)


def _action_dtype(num_actions: int | None) -> np.dtype:
    """uint8 when every action fits in a byte, int32 otherwise (or when unknown)."""
    if num_actions is not None and num_actions <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.int32)


class Replay:
    """Uniform replay over per-env ring buffers of single frames (see the module docstring)."""

    prioritized = False

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype | type,
        stack_size: int,
        n_step: int,
        gamma: float,
        num_actions: int,
        seed: int,
    ):
        """Validate the arguments, check the memory budget, then allocate the storage."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if stack_size < 1:
            raise ValueError(f"stack_size must be >= 1, got {stack_size}")
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        min_capacity = self.min_capacity(num_envs, stack_size, n_step)
        if capacity < min_capacity:
            raise ValueError(
                f"replay capacity {capacity} is too small: it must be at least "
                f"num_envs * (stack_size + n_step + 1) = {min_capacity}"
            )
        self.num_envs = int(num_envs)
        self.capacity_per_env = int(capacity) // self.num_envs
        self.capacity = self.capacity_per_env * self.num_envs  # slots actually stored
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self.stack_size = int(stack_size)
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.num_actions = int(num_actions)
        self.action_dtype = _action_dtype(self.num_actions)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

        needed = self.bytes_needed(
            capacity, num_envs, frame_shape, frame_dtype, self.prioritized, num_actions
        )
        frame_bytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.frame_dtype.itemsize
        check_fits_in_memory(needed, capacity, frame_bytes)

        self._frames = _allocate_zeros((self.capacity, *self.frame_shape), self.frame_dtype)
        self._actions = _allocate_zeros((self.capacity,), self.action_dtype)
        self._rewards = _allocate_zeros((self.capacity,), np.dtype(np.float32))
        self._flags = _allocate_zeros((self.capacity,), np.dtype(np.uint8))
        self._env_offsets = np.arange(self.num_envs, dtype=np.int64) * self.capacity_per_env
        self._num_adds = 0
        self._num_valid = 0
        self._lookahead_offsets = np.arange(1, self.n_step + 1, dtype=np.int64)
        self._stack_positions = np.arange(self.stack_size, dtype=np.int64)

    # ----------------------------------------------------------------------------------- sizing

    @staticmethod
    def min_capacity(num_envs: int, stack_size: int, n_step: int) -> int:
        """The smallest capacity that can hold one whole transition per env: a stack's
        history, the n-step lookahead and the slot being written."""
        return num_envs * (stack_size + n_step + 1)

    @staticmethod
    def bytes_needed(
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype | type,
        prioritized: bool,
        num_actions: int | None = None,
    ) -> int:
        """Exact bytes of the arrays a replay with these arguments allocates.

        `num_actions=None` assumes int32 actions (an upper bound); pass it to get uint8 actions.
        """
        slots = (int(capacity) // int(num_envs)) * int(num_envs)
        frame_bytes = int(np.prod(frame_shape, dtype=np.int64)) * np.dtype(frame_dtype).itemsize
        per_slot = frame_bytes + _action_dtype(num_actions).itemsize + 4 + 1  # reward, flags
        tree_bytes = SumTree.bytes_needed(slots, track_min=True) if prioritized else 0
        return slots * per_slot + tree_bytes

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the storage arrays."""
        arrays = (self._frames, self._actions, self._rewards, self._flags)
        return sum(array.nbytes for array in arrays)

    # --------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        """Number of currently valid sample starts (all envs together)."""
        return self._num_valid

    @property
    def num_adds(self) -> int:
        """Number of `add` calls so far (observations stored per env, including overwritten)."""
        return self._num_adds

    def can_sample(self, batch_size: int) -> bool:
        """Whether at least `batch_size` valid starts exist."""
        return 1 <= batch_size <= self._num_valid

    # ------------------------------------------------------------------------------------- add

    def add(
        self,
        frames: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        first: np.ndarray,
    ) -> None:
        """Store one observation per env: its newest frame, the action taken, the arrival info."""
        num_envs = self.num_envs
        frames = np.asarray(frames)
        if frames.shape != (num_envs, *self.frame_shape):
            raise ValueError(
                f"frames must have shape {(num_envs, *self.frame_shape)}, got {frames.shape}"
            )
        actions = self._per_env(actions, "actions")
        if np.any(actions < 0) or np.any(actions >= self.num_actions):
            raise ValueError(f"actions must be in [0, {self.num_actions}), got {actions}")
        rewards = self._per_env(rewards, "rewards").astype(np.float32)
        terminated = self._per_env(terminated, "terminated").astype(bool)
        truncated = self._per_env(truncated, "truncated").astype(bool)
        first = self._per_env(first, "first").astype(bool)
        if self._num_adds == 0 and not np.all(first):
            raise ValueError("the first add() must mark every env first=True")

        flags = first.view(np.uint8) | (terminated.view(np.uint8) << 1)
        flags |= truncated.view(np.uint8) << 2  # bits: FIRST=1, TERMINATED=2, TRUNCATED=4

        old_low, old_high = self._window(self._num_adds)
        new_low, new_high = self._window(self._num_adds + 1)
        # Times leaving the window, handled before their slot can be overwritten below.
        leaving_slots = self._slots_of_times(np.arange(old_low, min(old_high, new_low - 1) + 1))

        if self._num_adds > 0:
            previous_slots = self._env_offsets + (self._num_adds - 1) % self.capacity_per_env
            abandoned = first & ((self._flags[previous_slots] & LAST_OBS) == 0)
            # Those previous observations are not yet valid starts (their lookahead is unwritten),
            # so the valid count and priorities are unaffected.
            self._flags[previous_slots[abandoned]] |= TRUNCATED

        write_slots = self._env_offsets + self._num_adds % self.capacity_per_env
        leaving_was_valid = (self._flags[leaving_slots] & LAST_OBS) == 0
        self._frames[write_slots] = frames
        self._actions[write_slots] = actions
        self._rewards[write_slots] = rewards
        self._flags[write_slots] = flags
        self._num_adds += 1

        entering_slots = self._slots_of_times(np.arange(max(new_low, old_high + 1), new_high + 1))
        entering_is_valid = (self._flags[entering_slots] & LAST_OBS) == 0
        self._num_valid += int(entering_is_valid.sum()) - int(leaving_was_valid.sum())
        self._on_window_change(leaving_slots, entering_slots, entering_is_valid)

    def _on_window_change(
        self, leaving_slots: np.ndarray, entering_slots: np.ndarray, entering_is_valid: np.ndarray
    ) -> None:
        """Hook for subclasses: slots left / entered the valid window during the last add."""

    # ---------------------------------------------------------------------------------- sample

    def sample(self, batch_size: int) -> Sample:
        """Sample `batch_size` valid starts uniformly with replacement."""
        self._check_batch_size(batch_size)
        low, high = self._window(self._num_adds)
        span = high - low + 1
        chosen: list[np.ndarray] = []
        num_chosen = 0
        for _ in range(_MAX_REJECTION_ROUNDS):
            draws = self._rng.integers(0, self.num_envs * span, size=batch_size - num_chosen)
            candidates = self._env_offsets[draws // span] + (low + draws % span) % (
                self.capacity_per_env
            )
            candidates = candidates[(self._flags[candidates] & LAST_OBS) == 0]
            chosen.append(candidates)
            num_chosen += candidates.size
            if num_chosen == batch_size:
                break
        else:  # Almost every slot in the window is a last obs: enumerate the valid ones.
            valid = self._all_valid_indices()
            chosen.append(self._rng.choice(valid, size=batch_size - num_chosen))
        indices = np.concatenate(chosen).astype(np.int64)
        return Sample(
            transition=self._gather(indices),
            indices=indices,
            weights=np.ones(batch_size, dtype=np.float32),
        )

    def transitions_at(self, indices: np.ndarray) -> Transition:
        """Transitions starting at the given flat indices, which must be valid starts."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not np.all(self._is_valid_start(indices)):
            raise ValueError("transitions_at() got indices that are not valid sample starts")
        return self._gather(indices)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """No-op for uniform replay (kept so the learner can treat both kinds alike)."""

    # ------------------------------------------------------------------------------ checkpoints

    def layout(self) -> dict:
        """What the storage was built for; a saved state loads only into the same layout."""
        return {
            "kind": "prioritized" if self.prioritized else "uniform",
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "frame_shape": list(self.frame_shape),
            "frame_dtype": self.frame_dtype.str,
            "stack_size": self.stack_size,
            "n_step": self.n_step,
            "gamma": self.gamma,
            "num_actions": self.num_actions,
        }

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything that makes this replay what it is: (arrays, JSON-able scalars).

        With `load_state` on a replay of the same layout it gives back an identical memory
        that draws the same next samples. The arrays are views, not copies: save them before
        the next `add`.
        """
        arrays = {
            "frames": self._frames,
            "actions": self._actions,
            "rewards": self._rewards,
            "flags": self._flags,
        }
        scalars = {
            "layout": self.layout(),
            "num_adds": self._num_adds,
            "rng": self._rng.bit_generator.state,
        }
        return arrays, scalars

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Replace this replay's contents by a saved `state()`.

        A state of another layout, or with a bad array or counter, is a ValueError that
        changes nothing; one whose parts disagree with each other (found only once loaded)
        is a ValueError that leaves the replay empty, as if new. `arrays` may be this
        replay's own storage (from `state()`), already overwritten by the caller.
        """
        checked = self._checked_state(arrays, scalars)
        try:
            self._frames[...] = checked["frames"]
            self._actions[...] = checked["actions"]
            self._rewards[...] = checked["rewards"]
            self._flags[...] = checked["flags"]
            self._num_adds = checked["num_adds"]
            self._rng.bit_generator.state = checked["rng"]
            if self._num_adds > 0:
                written = min(self._num_adds, self.capacity_per_env)
                oldest = (self._num_adds - written) % self.capacity_per_env
                if self._num_adds <= self.capacity_per_env and not np.all(
                    self._flags[self._env_offsets + oldest] & FIRST
                ):
                    raise ValueError("replay state: time 0 is not marked first")
            self._num_valid = self._all_valid_indices().size
            self._after_load(checked)
        except Exception as error:
            self.reset()
            if isinstance(error, ValueError):
                raise
            raise ValueError(f"replay state: {type(error).__name__}: {error}") from None

    def seed_sampling(self, seed: int) -> None:
        """Restart the sampling RNG from `seed`, keeping what is stored: the same memory,
        restored from one checkpoint, sampled along other draws (an offline study's seeds)."""
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Forget every stored observation and restart the sampling RNG from the seed (the
        storage stays allocated): the replay is as if new."""
        self._num_adds = 0
        self._num_valid = 0
        self._rng = np.random.default_rng(self._seed)
        for small in (self._actions, self._rewards, self._flags):  # frames are never read
            small[...] = 0  # before they are written again

    def _checked_state(self, arrays: dict[str, np.ndarray], scalars: dict) -> dict:
        """The saved state's parts, each checked against this replay's layout."""
        if not isinstance(arrays, dict) or not isinstance(scalars, dict):
            raise ValueError("replay state: arrays and scalars must be mappings")
        if scalars.get("layout") != self.layout():
            raise ValueError(
                f"replay state of another layout ({scalars.get('layout')}, "
                f"this replay {self.layout()})"
            )
        expected = {
            "frames": ((self.capacity, *self.frame_shape), self.frame_dtype),
            "actions": ((self.capacity,), self.action_dtype),
            "rewards": ((self.capacity,), np.dtype(np.float32)),
            "flags": ((self.capacity,), np.dtype(np.uint8)),
        }
        checked: dict = {}
        for name, (shape, dtype) in expected.items():
            array = arrays.get(name)
            if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
                got = (getattr(array, "shape", None), getattr(array, "dtype", None))
                raise ValueError(f"replay state: {name} must be {shape} {dtype}, got {got}")
            checked[name] = array
        if np.any(checked["flags"] & ~_ALL_FLAGS):
            raise ValueError("replay state: unknown flag bits")
        if np.any(checked["actions"] >= self.num_actions):
            raise ValueError("replay state: action out of range")
        if not np.all(np.isfinite(checked["rewards"])):
            raise ValueError("replay state: non-finite rewards")
        num_adds = scalars.get("num_adds")
        if not isinstance(num_adds, int) or not 0 <= num_adds < MAX_ADDS:
            raise ValueError(f"replay state: num_adds must be in [0, 2**62), got {num_adds!r}")
        checked["num_adds"] = num_adds
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = scalars.get("rng")
        except Exception as error:  # numpy raises several types for a malformed state
            raise ValueError(f"replay state: bad sampling RNG state ({error!r})") from None
        checked["rng"] = rng.bit_generator.state
        return checked

    def _after_load(self, checked: dict) -> None:
        """Hook for subclasses: restore their own part of a checked state."""

    # ------------------------------------------------------------------------------- internals

    def _per_env(self, values: np.ndarray, name: str) -> np.ndarray:
        """`values` as an array of shape (num_envs,), or ValueError."""
        values = np.asarray(values)
        if values.shape != (self.num_envs,):
            raise ValueError(f"{name} must have shape ({self.num_envs},), got {values.shape}")
        return values

    def _check_batch_size(self, batch_size: int) -> None:
        """ValueError unless 1 <= batch_size <= number of valid starts."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > self._num_valid:
            raise ValueError(
                f"cannot sample a batch of {batch_size}: the replay holds only "
                f"{self._num_valid} valid transitions so far"
            )

    def _window(self, num_adds: int) -> tuple[int, int]:
        """Inclusive time range [low, high] of valid starts after `num_adds` adds (may be empty)."""
        high = num_adds - 1 - self.n_step
        if num_adds <= self.capacity_per_env:
            low = 0
        else:
            low = num_adds - self.capacity_per_env + self.stack_size - 1
        return low, high

    def _slots_of_times(self, times: np.ndarray) -> np.ndarray:
        """Flat indices of the given times in every env, shape (len(times) * num_envs,)."""
        slots = times.astype(np.int64) % self.capacity_per_env
        return (self._env_offsets[None, :] + slots[:, None]).reshape(-1)

    def _times_of(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(env, newest time stored at that slot) for flat indices."""
        env, slot = np.divmod(indices, self.capacity_per_env)
        newest = self._num_adds - 1
        return env, slot + self.capacity_per_env * ((newest - slot) // self.capacity_per_env)

    def _is_valid_start(self, indices: np.ndarray) -> np.ndarray:
        """Boolean mask: which flat indices are valid sample starts right now."""
        in_range = (indices >= 0) & (indices < self.capacity)
        safe = np.where(in_range, indices, 0)
        _, times = self._times_of(safe)
        low, high = self._window(self._num_adds)
        not_last = (self._flags[safe] & LAST_OBS) == 0
        return in_range & (times >= low) & (times <= high) & not_last

    def _all_valid_indices(self) -> np.ndarray:
        """Flat indices of every valid start (O(capacity); for fallbacks and checks)."""
        low, high = self._window(self._num_adds)
        if high < low:
            return np.zeros(0, dtype=np.int64)
        slots = self._slots_of_times(np.arange(low, high + 1))
        return np.sort(slots[(self._flags[slots] & LAST_OBS) == 0])

    def _gather(self, indices: np.ndarray) -> Transition:
        """Build the n-step transitions starting at valid flat indices (vectorised)."""
        env, start_times = self._times_of(indices)
        env_offset = self._env_offsets[env][:, None]
        ahead = (
            start_times[:, None] + self._lookahead_offsets
        ) % self.capacity_per_env + env_offset
        ahead_flags = self._flags[ahead]
        is_last = (ahead_flags & LAST_OBS) != 0
        walk_length = np.where(is_last.any(axis=1), is_last.argmax(axis=1) + 1, self.n_step)
        in_walk = self._lookahead_offsets[None, :] <= walk_length[:, None]
        step_discounts = np.where((ahead_flags & TERMINATED) != 0, 0.0, self.gamma)
        rewards = np.where(in_walk, self._rewards[ahead], 0.0).astype(np.float32)
        discounts = np.where(in_walk, step_discounts, 1.0).astype(np.float32)
        # Both stacks come from ONE gather into one array of shape (2, B, stack, *frame): two
        # separate ~1 MB results per call made glibc hand out fresh pages (hundreds of page
        # faults, 10x slower) whenever the caller still held the previous batch.
        end_times = np.stack([start_times, start_times + walk_length])
        stacks = self._frames[self._stack_sources(env_offset[:, 0], end_times)]
        return Transition(
            obs_tm1=stacks[0],
            action_tm1=self._actions[indices].astype(np.int32),
            rewards=rewards,
            discounts=discounts,
            obs_t=stacks[1],
        )

    def _stack_sources(self, env_offset: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Flat frame indices of the stacks ending at `times`, shape times.shape + (stack,).

        Positions before the latest FIRST slot in the stack window repeat that first frame.
        """
        oldest = times[..., None] - (self.stack_size - 1)
        history = (oldest + self._stack_positions) % self.capacity_per_env + env_offset[..., None]
        is_first = (self._flags[history] & FIRST) != 0
        latest_first = np.where(
            is_first.any(axis=-1), self.stack_size - 1 - is_first[..., ::-1].argmax(axis=-1), 0
        )
        positions = np.maximum(self._stack_positions, latest_first[..., None])
        return (oldest + positions) % self.capacity_per_env + env_offset[..., None]

    # ------------------------------------------------------------------------------ invariants

    def check_valid(self) -> None:
        """Assert the internal invariants (valid count, flags, episode boundaries)."""
        assert self._num_valid == self._all_valid_indices().size, "valid-start count drifted"
        assert np.all((self._flags & ~_ALL_FLAGS) == 0), "unknown flag bits set"
        assert np.all(self._actions < self.num_actions), "action out of range"
        written = min(self._num_adds, self.capacity_per_env)
        if written == 0:
            return
        times = np.arange(self._num_adds - written, self._num_adds)
        slots = (self._env_offsets[:, None] + times[None, :] % self.capacity_per_env).reshape(
            self.num_envs, written
        )
        flags = self._flags[slots]
        if times[0] == 0:
            assert np.all(flags[:, 0] & FIRST), "time 0 is not marked FIRST"
        # Every FIRST after the oldest stored time follows a last observation.
        starts_episode = (flags[:, 1:] & FIRST) != 0
        after_last = (flags[:, :-1] & LAST_OBS) != 0
        assert np.all(after_last[starts_episode]), "FIRST without a preceding last observation"


class PrioritizedReplay(Replay):
    """Proportional prioritized replay (Schaul et al. 2016) with stratified sampling.

    Priorities stored in the tree are (|td| + epsilon) ** alpha; new valid starts get the largest
    priority ever stored (1.0 at first). Beta is annealed linearly with the number of `sample`
    calls: the k-th call (k = 0, 1, ...) uses
    beta_start + (beta_end - beta_start) * min(1, k / beta_steps).
    """

    prioritized = True

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype | type,
        stack_size: int,
        n_step: int,
        gamma: float,
        num_actions: int,
        seed: int,
        alpha: float = 0.6,
        beta_start: float = 0.4,
        beta_end: float = 1.0,
        beta_steps: int = 1_000_000,
        epsilon: float = 1e-6,
    ):
        """Validate the prioritization arguments, then build the storage and trees."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not (0 <= beta_start <= 1 and 0 <= beta_end <= 1):
            raise ValueError(
                f"beta_start and beta_end must be in [0, 1], got {beta_start} and {beta_end}"
            )
        if beta_steps < 1:
            raise ValueError(f"beta_steps must be >= 1, got {beta_steps}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        super().__init__(
            capacity,
            num_envs,
            frame_shape,
            frame_dtype,
            stack_size,
            n_step,
            gamma,
            num_actions,
            seed,
        )
        self.alpha = float(alpha)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.beta_steps = int(beta_steps)
        self.epsilon = float(epsilon)
        self._num_sample_calls = 0
        self._tree = SumTree(self.capacity, track_min=True)

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the storage arrays and the priority trees."""
        return super().nbytes + self._tree.nbytes

    @property
    def beta(self) -> float:
        """Beta that the next `sample` call will use."""
        fraction = min(1.0, self._num_sample_calls / self.beta_steps)
        return self.beta_start + (self.beta_end - self.beta_start) * fraction

    def _on_window_change(
        self, leaving_slots: np.ndarray, entering_slots: np.ndarray, entering_is_valid: np.ndarray
    ) -> None:
        """Zero the priorities of slots that left the window; max priority for valid new ones."""
        if leaving_slots.size == 0 and entering_slots.size == 0:
            return
        entering_priorities = np.where(entering_is_valid, self._tree.max_priority, 0.0)
        self._tree.update(
            np.concatenate([leaving_slots, entering_slots]),
            np.concatenate([np.zeros(leaving_slots.size), entering_priorities]),
        )

    def sample(self, batch_size: int) -> Sample:
        """Stratified proportional sample with normalised importance weights."""
        self._check_batch_size(batch_size)
        beta = self.beta
        self._num_sample_calls += 1
        total = self._tree.total()
        segment = total / batch_size
        targets = (np.arange(batch_size) + self._rng.random(batch_size)) * segment
        targets = np.minimum(targets, np.nextafter(total, 0.0))
        indices = self._tree.sample(targets)
        probabilities = self._tree.get(indices) / total
        min_probability = self._tree.min_nonzero() / total
        # w_i = (N P(i))^-beta / max_j (N P(j))^-beta; the max weight belongs to the min priority.
        weights = (probabilities / min_probability) ** (-beta)
        return Sample(
            transition=self._gather(indices),
            indices=indices,
            weights=weights.astype(np.float32),
        )

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Set priorities (|td| + epsilon) ** alpha; indices no longer valid are ignored."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        td_errors = np.asarray(td_errors, dtype=np.float64).reshape(-1)
        if indices.shape != td_errors.shape:
            raise ValueError(
                f"indices and td_errors differ in size: {indices.size} vs {td_errors.size}"
            )
        if not np.all(np.isfinite(td_errors)):
            raise ValueError("update_priorities() got non-finite td_errors")
        still_valid = self._is_valid_start(indices)
        priorities = (np.abs(td_errors[still_valid]) + self.epsilon) ** self.alpha
        # Keep every valid start strictly positive even if the power underflows.
        priorities = np.maximum(priorities, np.finfo(np.float64).tiny)
        self._tree.update(indices[still_valid], priorities)

    def layout(self) -> dict:
        """The uniform layout plus the settings stored priorities depend on (beta's
        schedule is not one: a restored replay continues its count of samples under the
        schedule of the run that loads it, e.g. one extended to more frames)."""
        return {**super().layout(), "alpha": self.alpha, "epsilon": self.epsilon}

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The uniform state plus the leaf priorities, max priority and beta's position.

        Only the leaves are saved: the tree's inner nodes are recomputed on load.
        """
        arrays, scalars = super().state()
        arrays["priorities"] = self._tree.get(np.arange(self.capacity))
        scalars["max_priority"] = self._tree.max_priority
        scalars["num_sample_calls"] = self._num_sample_calls
        return arrays, scalars

    def _checked_state(self, arrays: dict[str, np.ndarray], scalars: dict) -> dict:
        checked = super()._checked_state(arrays, scalars)
        priorities = arrays.get("priorities")
        if (
            not isinstance(priorities, np.ndarray)
            or priorities.shape != (self.capacity,)
            or priorities.dtype != np.float64
        ):
            raise ValueError(f"replay state: priorities must be ({self.capacity},) float64")
        max_priority = scalars.get("max_priority")
        calls = scalars.get("num_sample_calls")
        if not isinstance(max_priority, float) or not 0 < max_priority < np.inf:
            raise ValueError(f"replay state: bad max_priority {max_priority!r}")
        if not isinstance(calls, int) or calls < 0:
            raise ValueError(f"replay state: bad num_sample_calls {calls!r}")
        if not np.all(np.isfinite(priorities)) or np.any(priorities < 0):
            raise ValueError("replay state: priorities must be finite and >= 0")
        if np.any(priorities > max_priority):
            raise ValueError("replay state: a priority exceeds max_priority")
        checked.update(priorities=priorities, max_priority=max_priority, num_sample_calls=calls)
        return checked

    def _after_load(self, checked: dict) -> None:
        """Rebuild the trees from the saved leaves; a valid start must have a priority."""
        valid = np.zeros(self.capacity, dtype=bool)
        valid[self._all_valid_indices()] = True
        if not np.array_equal(checked["priorities"] > 0, valid):
            raise ValueError("replay state: priorities are not positive exactly at valid starts")
        self._tree = SumTree(self.capacity, track_min=True)
        self._tree.update(np.arange(self.capacity), checked["priorities"])
        self._tree.max_priority = checked["max_priority"]
        self._num_sample_calls = checked["num_sample_calls"]

    def reset(self) -> None:
        """Forget every stored observation and priority."""
        super().reset()
        self._tree = SumTree(self.capacity, track_min=True)
        self._num_sample_calls = 0

    def priorities(self, indices: np.ndarray) -> np.ndarray:
        """Stored priorities (already raised to alpha) at flat indices; 0 for invalid starts."""
        return self._tree.get(indices)

    def check_valid(self) -> None:
        """Assert the base invariants plus: non-zero priority exactly at valid starts."""
        super().check_valid()
        self._tree.check_valid()
        nonzero = np.flatnonzero(self._tree.get(np.arange(self.capacity)) > 0)
        assert np.array_equal(nonzero, self._all_valid_indices()), (
            "non-zero priorities differ from the valid starts"
        )
