"""DC-ASGD under controlled gradient delays: sequential SGD, ASGD, DC-ASGD-c and DC-ASGD-a.

Task: a fixed synthetic 10-class problem (labels from a random teacher MLP), learnt by a small
tanh MLP with softmax cross-entropy and minibatch SGD at a fixed learning rate. Every update t
uses a gradient computed on the parameters of version max(t - tau, 0) and applies it to the
current parameters (version t), which is what an asynchronous parameter server sees when tau
other updates land between a worker's read and its push. tau = 0 is sequential SGD.

- ASGD: ``optax.sgd(lr)`` on the stale gradient.
- DC-ASGD-c / DC-ASGD-a: ``optax.chain(gorila_jax.core.optim.dc_asgd(...), optax.sgd(lr))`` with
  ``params`` = current and ``stale_params`` = the version the gradient was computed on.

Everything for one method runs as one jitted ``lax.scan``, vmapped over seeds and over tau (the
delay is read from a ring buffer of the last ``max(tau) + 1`` parameter versions, so tau is a
traced value and one compilation serves all delays).

Protocol (all choices on *tuning seeds*, disjoint from the reported seeds):

1. learning rate: the value of ``Settings.lr_grid`` with the lowest final training loss of
   sequential SGD (tau = 0), the usual "tune the sequential baseline, then add workers" protocol;
2. lambda: the paper's defaults (0.04 constant; 2.0 adaptive with momentum 0.95) are reported
   as they are; separately, a "tuned" lambda is picked per form and per tau from a small
   log-spaced grid by the lowest mean final training loss on the tuning seeds;
3. control: ASGD with the learning rate re-tuned per tau on the same grid (is compensation
   better than a smaller step?);
4. the reported seeds are then run with everything fixed; they are used for no choice.

python experiments/dc_asgd_delay.py                 # full run, writes docs/dc_asgd/
python experiments/dc_asgd_delay.py --quick --out /tmp/dc   # seconds, for the smoke test
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gorila_jax.core import cli
from gorila_jax.core.optim import dc_asgd

PAPER_LAMBDA = {"dc_c": 0.04, "dc_a": 2.0}
"""DC-ASGD defaults of Zheng et al. 2017 (constant form; adaptive form with momentum 0.95)."""
ADAPTIVE_MOMENTUM = 0.95

METHOD_LABELS = {
    "asgd": "ASGD",
    "dc_c": "DC-ASGD-c",
    "dc_a": "DC-ASGD-a",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines a run (hashable: it keys the compilation cache)."""

    taus: tuple[int, ...] = (0, 4, 16, 64)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tuning_seed_offset: int = 1000
    updates: int = 3000
    eval_every: int = 50
    batch_size: int = 32
    input_dim: int = 16
    hidden: int = 64
    num_classes: int = 10
    teacher_hidden: int = 32
    num_train: int = 8192
    num_test: int = 2048
    data_seed: int = 12345
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    lambda_grid_c: tuple[float, ...] = (0.04, 0.2, 1.0, 5.0, 25.0, 125.0, 625.0, 3125.0)
    lambda_grid_a: tuple[float, ...] = (0.5, 2.0, 8.0, 32.0)

    @property
    def tuning_seeds(self) -> tuple[int, ...]:
        """As many seeds as reported, disjoint from them (same shapes: no recompilation)."""
        return tuple(self.tuning_seed_offset + i for i in range(len(self.seeds)))

    @property
    def num_evals(self) -> int:
        return self.updates // self.eval_every

    @property
    def buffer_size(self) -> int:
        return max(self.taus) + 1


def quick_settings() -> Settings:
    """Tiny settings for the smoke test: seconds, same code path."""
    return Settings(
        taus=(0, 4),
        seeds=(0, 1),
        updates=60,
        eval_every=20,
        hidden=16,
        num_train=256,
        num_test=256,
        lr_grid=(0.1, 1.0),
        lambda_grid_c=(0.04,),
        lambda_grid_a=(2.0,),
    )


# ----------------------------------------------------------------------------- task


def make_dataset(s: Settings) -> dict[str, jax.Array]:
    """Gaussian inputs labelled by a fixed random teacher MLP (argmax of its logits)."""
    rng = np.random.default_rng(s.data_seed)
    n = s.num_train + s.num_test
    x = rng.standard_normal((n, s.input_dim)).astype(np.float32)
    w1 = rng.standard_normal((s.input_dim, s.teacher_hidden)) / math.sqrt(s.input_dim)
    w2 = rng.standard_normal((s.teacher_hidden, s.num_classes)) / math.sqrt(s.teacher_hidden)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)
    return {
        "x_train": jnp.asarray(x[: s.num_train]),
        "y_train": jnp.asarray(y[: s.num_train]),
        "x_test": jnp.asarray(x[s.num_train :]),
        "y_test": jnp.asarray(y[s.num_train :]),
    }


def seed_inputs(s: Settings, seeds: tuple[int, ...]) -> dict[str, object]:
    """Per seed: the initial parameters and the minibatch indices of every update (numpy).

    Drawn on the host so that the compiled training loop holds no random-number generator
    (that keeps XLA compilation short). A seed fixes both, so for a given seed every method
    and every tau starts from the same init and sees the same batches (common random numbers).
    """
    inits, batches = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        inits.append(
            {
                "w1": rng.standard_normal((s.input_dim, s.hidden)) / math.sqrt(s.input_dim),
                "b1": np.zeros(s.hidden),
                "w2": rng.standard_normal((s.hidden, s.num_classes)) / math.sqrt(s.hidden),
                "b2": np.zeros(s.num_classes),
            }
        )
        batches.append(rng.integers(0, s.num_train, (s.updates, s.batch_size)))
    return {
        "params": jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), jnp.float32), *inits),
        "batches": jnp.asarray(np.stack(batches), jnp.int32),
    }


def logits_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def error_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits_fn(params, x), axis=1) != y)


# ----------------------------------------------------------------------------- delayed SGD


def make_optimizer(method: str, lambda_: float, lr: jax.Array) -> optax.GradientTransformation:
    """ASGD is plain SGD on the stale gradient; DC-ASGD chains the real transform before it."""
    if method == "asgd":
        return optax.sgd(lr)
    if method == "dc_c":
        return optax.chain(dc_asgd(lambda_), optax.sgd(lr))
    if method == "dc_a":
        return optax.chain(
            dc_asgd(lambda_, adaptive=True, momentum=ADAPTIVE_MOMENTUM), optax.sgd(lr)
        )
    raise ValueError(f"unknown method {method!r}")


def run_one(
    method: str,
    lambda_: float,
    s: Settings,
    data: dict[str, jax.Array],
    params: dict[str, jax.Array],
    batches: jax.Array,
    tau: jax.Array,
    lr: jax.Array,
) -> dict[str, jax.Array]:
    """One training run from ``params`` with minibatch indices ``batches`` [updates, batch].

    Returns the full-training-set loss before training and after every ``eval_every`` updates,
    and the final test error.
    """
    opt = make_optimizer(method, lambda_, lr)
    opt_state = opt.init(params)
    # Ring buffer of parameter versions: version v lives in slot v % buffer_size. Slots not
    # written yet hold version 0, which is what max(t - tau, 0) reads during the first steps.
    ring = jax.tree.map(lambda p: jnp.repeat(p[None], s.buffer_size, axis=0), params)
    x_train, y_train = data["x_train"], data["y_train"]

    def update(carry, inputs):
        params, opt_state, ring = carry
        t, idx = inputs  # t = version of `params` = number of updates applied so far
        ring = jax.tree.map(
            lambda r, p: jax.lax.dynamic_update_index_in_dim(r, p, t % s.buffer_size, 0),
            ring,
            params,
        )
        version = jnp.maximum(t - tau, 0)
        stale = jax.tree.map(
            lambda r: jax.lax.dynamic_index_in_dim(r, version % s.buffer_size, 0, False), ring
        )
        grads = jax.grad(loss_fn)(stale, x_train[idx], y_train[idx])
        updates, opt_state = opt.update(grads, opt_state, params, stale_params=stale)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, ring), None

    def block(carry, inputs):
        carry, _ = jax.lax.scan(update, carry, inputs)
        return carry, loss_fn(carry[0], x_train, y_train)

    steps = jnp.arange(s.num_evals * s.eval_every).reshape(s.num_evals, s.eval_every)
    blocks = batches[: s.num_evals * s.eval_every].reshape(s.num_evals, s.eval_every, -1)
    initial = loss_fn(params, x_train, y_train)
    (params, _, _), losses = jax.lax.scan(block, (params, opt_state, ring), (steps, blocks))
    # Divergence: report inf rather than NaN so that means and comparisons stay meaningful.
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    return {
        "loss": jnp.concatenate([initial[None], losses]),
        "test_error": error_fn(params, data["x_test"], data["y_test"]),
    }


@functools.cache
def compiled_runner(method: str, lambda_: float, s: Settings):
    """jit(vmap over tau (outer) and seeds (inner)); one compilation per (method, lambda)."""

    def run(data, inputs, taus, lr):
        def per_seed(params, batches, tau):
            return run_one(method, lambda_, s, data, params, batches, tau, lr)

        over_seeds = jax.vmap(per_seed, in_axes=(0, 0, None))
        return jax.vmap(over_seeds, in_axes=(None, None, 0))(
            inputs["params"], inputs["batches"], taus
        )

    return jax.jit(run)


@functools.cache
def dataset(s: Settings) -> dict[str, jax.Array]:
    return make_dataset(s)


@functools.cache
def run_method(
    method: str,
    lambda_: float,
    s: Settings,
    seeds: tuple[int, ...],
    taus: tuple[int, ...],
    lr: float,
) -> dict[str, np.ndarray]:
    """Returns ``loss`` [tau, seed, num_evals + 1] and ``test_error`` [tau, seed] as numpy.

    Memoised (runs are deterministic), so a configuration needed twice is run once; callers
    must not modify the returned arrays.
    """
    out = compiled_runner(method, lambda_, s)(
        dataset(s), seed_inputs(s, seeds), jnp.asarray(taus, dtype=jnp.int32), jnp.float32(lr)
    )
    return jax.tree.map(np.asarray, out)


def final_loss(curves: np.ndarray) -> np.ndarray:
    """Final training loss: the last evaluation (full training set), per run."""
    return curves[..., -1]


# ----------------------------------------------------------------------------- protocol


def _delayed(s: Settings) -> list[int]:
    return [i for i, tau in enumerate(s.taus) if tau > 0]


def choose_lr(s: Settings) -> tuple[float, np.ndarray]:
    """Runs plain (A)SGD over ``lr_grid`` on the tuning seeds, at every tau.

    Returns the learning rate with the lowest mean final loss of sequential SGD (tau = 0),
    used by every method, and the table [lr, tau] of mean final losses (its delayed columns
    give the per-tau re-tuned learning rate of the "ASGD, lr re-tuned" control).
    """
    table = np.stack(
        [
            final_loss(run_method("asgd", 0.0, s, s.tuning_seeds, s.taus, lr)["loss"]).mean(axis=1)
            for lr in s.lr_grid
        ]
    )  # [lr, tau]
    return s.lr_grid[int(np.argmin(table[:, s.taus.index(0)]))], table


def tune_lambdas(s: Settings, lr: float) -> dict[str, np.ndarray]:
    """Per DC-ASGD form, the table [lambda, tau] of mean final losses on the tuning seeds."""
    return {
        method: np.stack(
            [
                final_loss(run_method(method, lam, s, s.tuning_seeds, s.taus, lr)["loss"]).mean(
                    axis=1
                )
                for lam in grid
            ]
        )
        for method, grid in (("dc_c", s.lambda_grid_c), ("dc_a", s.lambda_grid_a))
    }


def run_per_tau(s: Settings, configs: dict[int, tuple[str, float, float]], fallback):
    """Reported-seed runs where each tau has its own (method, lambda, lr).

    Every call runs all taus (the same shapes everywhere, so nothing is recompiled) and keeps
    row i; taus missing from ``configs`` (tau = 0) are copied from ``fallback``.
    """
    loss = np.array(fallback["loss"], copy=True)
    err = np.array(fallback["test_error"], copy=True)
    for i, tau in enumerate(s.taus):
        if tau in configs:
            method, lam, lr = configs[tau]
            out = run_method(method, lam, s, s.seeds, s.taus, lr)
            loss[i], err[i] = out["loss"][i], out["test_error"][i]
    return {"loss": loss, "test_error": err}


def run_experiment(s: Settings) -> dict:
    """The whole protocol; returns everything the outputs are made of."""
    if 0 not in s.taus:
        raise ValueError("taus must include 0 (sequential SGD, the baseline)")
    start = time.perf_counter()
    lr, lr_table = choose_lr(s)
    lambda_tables = tune_lambdas(s, lr)

    # chosen[(row key, tau)] = the tuned value (lambda, or lr for "asgd_lr") of that row at tau.
    chosen: dict[tuple[str, int], float] = {}
    for i in _delayed(s):
        tau = s.taus[i]
        chosen[("asgd_lr", tau)] = s.lr_grid[int(np.argmin(lr_table[:, i]))]
        chosen[("dc_c_tuned", tau)] = s.lambda_grid_c[int(np.argmin(lambda_tables["dc_c"][:, i]))]
        chosen[("dc_a_tuned", tau)] = s.lambda_grid_a[int(np.argmin(lambda_tables["dc_a"][:, i]))]

    res: dict[str, dict[str, np.ndarray]] = {}
    res["asgd"] = run_method("asgd", 0.0, s, s.seeds, s.taus, lr)
    delayed_taus = [s.taus[i] for i in _delayed(s)]
    res["asgd_lr"] = run_per_tau(
        s, {t: ("asgd", 0.0, chosen[("asgd_lr", t)]) for t in delayed_taus}, res["asgd"]
    )
    for method in ("dc_c", "dc_a"):
        res[f"{method}_paper"] = run_method(method, PAPER_LAMBDA[method], s, s.seeds, s.taus, lr)
        res[f"{method}_tuned"] = run_per_tau(
            s,
            {t: (method, chosen[(f"{method}_tuned", t)], lr) for t in delayed_taus},
            res["asgd"],
        )
    return {
        "settings": s,
        "lr": lr,
        "lr_table": lr_table,
        "lambda_tables": lambda_tables,
        "chosen": chosen,
        "results": res,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- outputs

ROWS = (
    ("asgd", "ASGD"),
    ("asgd_lr", "ASGD, lr re-tuned per τ"),
    ("dc_c_paper", "DC-ASGD-c, paper λ=0.04"),
    ("dc_a_paper", "DC-ASGD-a, paper λ=2"),
    ("dc_c_tuned", "DC-ASGD-c, tuned λ"),
    ("dc_a_tuned", "DC-ASGD-a, tuned λ"),
)
LABELS = dict(ROWS)
DC_ROWS = ("dc_c_paper", "dc_a_paper", "dc_c_tuned", "dc_a_tuned")


def _tuned_note(key: str, tau: int, chosen: dict) -> str:
    if (key, tau) not in chosen:
        return ""
    name = "lr" if key == "asgd_lr" else "λ"
    return f"{name}={chosen[(key, tau)]:g}"


def _mean_std(values: np.ndarray, fmt: str) -> str:
    if not np.all(np.isfinite(values)):
        return f"diverged ({int(np.sum(~np.isfinite(values)))}/{values.size} seeds)"
    return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"


def _metric(res: dict, key: str, metric: str) -> np.ndarray:
    """[tau, seed]: final training loss, or test error in %."""
    if metric == "loss":
        return final_loss(res[key]["loss"])
    return 100.0 * res[key]["test_error"]


def results_table(exp: dict, metric: str, fmt: str) -> list[str]:
    s: Settings = exp["settings"]
    res = exp["results"]
    i0 = s.taus.index(0)
    seq = _metric(res, "asgd", metric)[i0]
    lines = [
        "| method | " + " | ".join(f"τ = {t}" for t in s.taus) + " |",
        "|---" * (len(s.taus) + 1) + "|",
        "| sequential SGD (τ = 0), for reference | "
        + " | ".join(_mean_std(seq, fmt) for _ in s.taus)
        + " |",
    ]
    for key, label in ROWS:
        cells = []
        for i, tau in enumerate(s.taus):
            note = _tuned_note(key, tau, exp["chosen"])
            cell = _mean_std(_metric(res, key, metric)[i], fmt)
            cells.append(f"{cell} ({note})" if note else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def tuning_tables(exp: dict) -> list[str]:
    s: Settings = exp["settings"]
    lines = []
    tables = (
        ("lr (plain SGD/ASGD)", s.lr_grid, exp["lr_table"], list(range(len(s.taus)))),
        ("DC-ASGD-c λ", s.lambda_grid_c, exp["lambda_tables"]["dc_c"], _delayed(s)),
        ("DC-ASGD-a λ", s.lambda_grid_a, exp["lambda_tables"]["dc_a"], _delayed(s)),
    )
    for title, grid, table, cols in tables:
        lines.append(f"| {title} | " + " | ".join(f"τ = {s.taus[i]}" for i in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for value, row in zip(grid, table, strict=True):
            cells = [f"{row[i]:.4f}" if np.isfinite(row[i]) else "diverged" for i in cols]
            lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _final_mean(res: dict, key: str, i: int) -> float:
    return float(np.mean(final_loss(res[key]["loss"][i])))


def _share(res: dict, key: str, i: int, seq: float) -> float:
    """Share of ASGD's gap to sequential SGD removed by row ``key`` at tau index i."""
    asgd = _final_mean(res, "asgd", i)
    return (asgd - _final_mean(res, key, i)) / (asgd - seq)


def gap_table(exp: dict) -> list[str]:
    """Per delayed tau: the cost of the delay and the share of it each row removes."""
    s: Settings = exp["settings"]
    res = exp["results"]
    n = len(s.seeds)
    seq = _final_mean(res, "asgd", s.taus.index(0))
    cols = _delayed(s)
    lines = [
        "| | " + " | ".join(f"τ = {s.taus[i]}" for i in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        "| delay cost: ASGD − sequential (final loss) | "
        + " | ".join(f"{_final_mean(res, 'asgd', i) - seq:+.4f}" for i in cols)
        + " |",
    ]
    for key in ("asgd_lr", *DC_ROWS):
        cells = []
        for i in cols:
            other = final_loss(res[key]["loss"][i])
            asgd = final_loss(res["asgd"]["loss"][i])
            if not (np.all(np.isfinite(other)) and np.all(np.isfinite(asgd))):
                cells.append("diverged")
                continue
            wins = int(np.sum(other < asgd))
            cells.append(f"{100 * _share(res, key, i, seq):+.0f}% ({wins}/{n})")
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return lines


def reading(exp: dict) -> list[str]:
    """Plain statements computed from the numbers, so that the text cannot drift from them."""
    s: Settings = exp["settings"]
    res, chosen = exp["results"], exp["chosen"]
    n = len(s.seeds)
    seq_all = final_loss(res["asgd"]["loss"][s.taus.index(0)])
    seq, seq_std = float(np.mean(seq_all)), float(np.std(seq_all))
    finite = all(
        np.all(np.isfinite(final_loss(res[k]["loss"]))) for k in ("asgd", "asgd_lr", *DC_ROWS)
    )
    if not finite:
        return ["- Some runs diverged (see the tables); no shares are summarised."]

    def wins(key: str, i: int) -> int:
        return int(np.sum(final_loss(res[key]["loss"][i]) < final_loss(res["asgd"]["loss"][i])))

    out = []
    for i in _delayed(s):
        tau = s.taus[i]
        gap = _final_mean(res, "asgd", i) - seq
        line = (
            f"- τ = {tau}: the delay costs {gap:+.4f} "
            f"({gap / seq_std:.1f} seed-std of sequential SGD). "
        )
        best = max(DC_ROWS, key=lambda k: _share(res, k, i, seq))
        best_share, best_mean = _share(res, best, i, seq), _final_mean(res, best, i)
        if best_share <= 0.1:
            worst = min(DC_ROWS, key=lambda k: _share(res, k, i, seq))
            line += (
                f"No DC variant helps (best {100 * best_share:+.0f}%; {LABELS[worst]} "
                f"{100 * _share(res, worst, i, seq):+.0f}%, worse than ASGD on "
                f"{n - wins(worst, i)}/{n} seeds)"
            )
        else:
            reach = "reaching" if best_mean <= seq + seq_std else "still short of"
            line += (
                f"Best DC variant: {LABELS[best]} ({_tuned_note(best, tau, chosen) or 'untuned'}"
                f"), removing {100 * best_share:.0f}% of it, better than ASGD on "
                f"{wins(best, i)}/{n} seeds, {reach} sequential SGD ({best_mean:.4f} vs "
                f"{seq:.4f})"
            )
        ctrl_lr = chosen[("asgd_lr", tau)]
        ctrl_mean = _final_mean(res, "asgd_lr", i)
        if ctrl_lr == exp["lr"]:
            line += "; a smaller step from the lr grid does not help ASGD at this τ."
        elif best_share > 0.1 and ctrl_mean <= best_mean:
            line += (
                f"; but plain ASGD with lr {ctrl_lr:g} instead of {exp['lr']:g} does as well "
                f"({ctrl_mean:.4f}): the gain is one that a smaller step also gives."
            )
        else:
            line += f"; plain ASGD with lr {ctrl_lr:g} gets {ctrl_mean:.4f}."
        out.append(line)

    large = _delayed(s)
    worst_c = max(abs(_share(res, "dc_c_paper", i, seq)) for i in large)
    effect = "practically a no-op" if worst_c < 0.1 else "not a no-op"
    tuned_c = ", ".join(f"{chosen[('dc_c_tuned', s.taus[i])]:g}" for i in large)
    out.append(
        f"- The paper's constant λ = {PAPER_LAMBDA['dc_c']:g} is {effect} here (at most "
        f"{100 * worst_c:.0f}% of the gap at any τ); the tuning seeds pick {tuned_c} for "
        f"τ = {', '.join(str(s.taus[i]) for i in large)}: the size of λ g ⊙ g follows the "
        "scale of the gradients, so a constant λ need not transfer between tasks. The "
        f"adaptive form at the paper's λ = {PAPER_LAMBDA['dc_a']:g} needs no tuning to act, "
        "but its effect changes sign with τ ("
        + ", ".join(
            f"{100 * _share(res, 'dc_a_paper', i, seq):+.0f}% at τ = {s.taus[i]}" for i in large
        )
        + ")."
    )
    diverged = []
    for name, grid, table in (
        ("constant", s.lambda_grid_c, exp["lambda_tables"]["dc_c"]),
        ("adaptive", s.lambda_grid_a, exp["lambda_tables"]["dc_a"]),
    ):
        bad = [f"{g:g}" for g, row in zip(grid, table, strict=True) if not np.all(np.isfinite(row))]
        if bad:
            diverged.append(f"{name} λ ∈ {{{', '.join(bad)}}}")
    out.append(
        (
            "- Too much compensation diverges (tuning seeds: " + ", ".join(diverged) + "). "
            if diverged
            else "- "
        )
        + "Not tried: DC-ASGD together with a smaller step, optimizers other than plain SGD, "
        "other tasks, and delays that vary from update to update."
    )
    return out


def write_results(exp: dict, command: str) -> str:
    s: Settings = exp["settings"]
    return "\n".join(
        [
            "# DC-ASGD under controlled delays",
            "",
            f"Produced by `{command}` in {exp['seconds']:.0f} s of wall time "
            f"({jax.device_count()} {jax.default_backend().upper()} device, "
            f"JAX {jax.__version__}, {os.cpu_count()} cores shared with other jobs); every "
            "number below comes from that run and is deterministic given the seeds.",
            "",
            f"**Task.** {s.num_classes}-class synthetic classification: {s.num_train} training "
            f"and {s.num_test} test points, {s.input_dim}-d Gaussian inputs, label = argmax of a "
            f"fixed random tanh teacher with {s.teacher_hidden} hidden units. Learner: a "
            f"{s.input_dim}-{s.hidden}-{s.num_classes} tanh MLP, softmax cross-entropy, "
            f"minibatch {s.batch_size}, {s.updates} updates of plain SGD at a fixed learning "
            "rate. The gradient of update t is computed on the parameters of version "
            "max(t − τ, 0) and applied to version t (ring buffer of versions, one jitted "
            "`lax.scan` vmapped over seeds and τ). DC-ASGD is "
            "`gorila_jax.core.optim.dc_asgd` chained before `optax.sgd`, with `stale_params` = "
            "the version the gradient came from. At "
            "τ = 0 every method is sequential SGD exactly (params − stale_params = 0).",
            "",
            f"**Seeds.** Reported: {list(s.seeds)} (a seed fixes init and minibatch order, the "
            "same for every method and τ). Every choice below was made on the disjoint tuning "
            f"seeds {list(s.tuning_seeds)}; the reported seeds were used for no choice.",
            "",
            f"**Learning rate** {exp['lr']:g}: the lowest final training loss of sequential SGD "
            f"over {list(s.lr_grid)} (first table in the tuning section), used by every method. "
            "The control row *ASGD, lr re-tuned per τ* instead takes, for each τ, the grid "
            "learning rate with the lowest ASGD loss at that τ: is compensation better than "
            "just a smaller step?",
            "",
            "**λ.** The paper's defaults as they are (0.04 constant; 2 adaptive with momentum "
            "0.95), and separately a *tuned λ* per form and per τ: the grid value with the "
            f"lowest mean final training loss on the tuning seeds (constant grid "
            f"{list(s.lambda_grid_c)}, adaptive grid {list(s.lambda_grid_a)}).",
            "",
            "## Final training loss (full training set), mean ± std over the reported seeds",
            "",
            *results_table(exp, "loss", ".4f"),
            "",
            "## Final test error (%), mean ± std over the reported seeds",
            "",
            *results_table(exp, "test_error", ".2f"),
            "",
            "![training loss against updates, one panel per τ](loss_vs_updates.png)",
            "",
            "## Reading",
            "",
            "Share of ASGD's delay cost (mean final loss of ASGD minus sequential SGD) that each "
            "variant removes, and on how many reported seeds it beats ASGD (same seed, same "
            "batches): 100% would reach sequential SGD, a negative share is worse than "
            "uncompensated ASGD.",
            "",
            *gap_table(exp),
            "",
            *reading(exp),
            "",
            "For reference, Zheng et al. (2017) report for ResNet-20 on CIFAR-10 with 4 workers "
            "8.19% test error for DC-ASGD-a against 9.27% for ASGD and 8.65% for sequential "
            "SGD. This toy task is not that setting; only the direction of the effects is "
            "comparable.",
            "",
            "## How this setting was arrived at",
            "",
            "Exploratory runs before this protocol (tuning seeds): with 2048 training points "
            "the MLP interpolated the data (training loss → 0.003 while test error rose), "
            "delays of 4 and 16 did not hurt sequential SGD at its best learning rate, and "
            "DC-ASGD-a (λ = 2, lr 0.3) was worse than ASGD at τ = 64 (0.56 vs 0.09 final "
            "loss); the training set was raised to 8192 points so that the optimisation is not "
            "trivial. A first full run stopped the constant-λ grid at 125 and picked that edge "
            "value (that run also printed the reported seeds' numbers), so the grid was "
            "extended (625 and 3125 diverge); nothing else changed between that run and this "
            "one except the added ASGD-lr control row. The learning rate and λ were never "
            "chosen on the reported seeds.",
            "",
            "## Tuning runs (mean final training loss on the tuning seeds)",
            "",
            *tuning_tables(exp),
        ]
    )


def plot(exp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s: Settings = exp["settings"]
    res = exp["results"]
    steps = np.arange(s.num_evals + 1) * s.eval_every
    ncols = min(2, len(s.taus))
    nrows = math.ceil(len(s.taus) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), sharey=True, squeeze=False
    )
    axes = axes.ravel()
    styles = {  # ASGD is drawn wide so that curves lying on top of it stay visible.
        "asgd": ("tab:red", "-"),
        "asgd_lr": ("tab:gray", "-."),
        "dc_c_paper": ("tab:blue", "-"),
        "dc_a_paper": ("tab:green", "-"),
        "dc_c_tuned": ("tab:blue", ":"),
        "dc_a_tuned": ("tab:green", ":"),
    }
    seq = res["asgd"]["loss"][s.taus.index(0)]
    for i, (ax, tau) in enumerate(zip(axes, s.taus, strict=True)):
        _band(ax, steps, seq, "black", "--", "sequential SGD (τ = 0)", 1.6)
        if tau > 0:
            for key, label in ROWS:
                note = _tuned_note(key, tau, exp["chosen"])
                if note:
                    label = label.replace("tuned λ", "tuned").replace("re-tuned per τ", "re-tuned")
                    label = f"{label} {note}"
                color, ls = styles[key]
                width = 3.0 if key == "asgd" else 1.4
                _band(ax, steps, res[key]["loss"][i], color, ls, label, width)
        ax.set_title(f"τ = {tau}" + (": every method = sequential SGD" if tau == 0 else ""))
        ax.set_xlabel("updates")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[::ncols]:
        ax.set_ylabel("training loss (cross-entropy, full set)")
    for ax in axes[len(s.taus) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"Gradients τ versions stale, lr = {exp['lr']:g}: mean over {len(s.seeds)} seeds, "
        "band = min..max over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(ax, steps, curves, color, ls, label, width=1.4) -> None:
    curves = np.where(np.isfinite(curves), curves, np.nan)
    ax.plot(steps, np.nanmean(curves, axis=0), color=color, ls=ls, label=label, lw=width)
    ax.fill_between(
        steps, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=color, alpha=0.12
    )


@dataclasses.dataclass(frozen=True)
class DelayArgs:
    """Run the DC-ASGD delay experiment."""

    seeds: int | None = None
    """number of reported seeds 0..n-1 (default 5)"""
    updates: int | None = None
    """updates per run"""
    out: Path = Path("docs/dc_asgd")
    """output folder"""
    quick: bool = False
    """tiny settings (smoke test)"""


def experiment(args: DelayArgs) -> int:
    """Run the experiment with the settings the flags give; write the plot and results.md."""
    s = quick_settings() if args.quick else Settings()
    if args.seeds is not None:
        if args.seeds < 1:
            raise cli.CommandLineError("--seeds must be >= 1")
        s = dataclasses.replace(s, seeds=tuple(range(args.seeds)))
    if args.updates is not None:
        if args.updates < s.eval_every or args.updates % s.eval_every:
            raise cli.CommandLineError(f"--updates must be a positive multiple of {s.eval_every}")
        s = dataclasses.replace(s, updates=args.updates)

    exp = run_experiment(s)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        shlex.quote(a) for a in ["experiments/dc_asgd_delay.py", *sys.argv[1:]]
    )
    plot(exp, args.out / "loss_vs_updates.png")
    (args.out / "results.md").write_text(write_results(exp, command))
    print((args.out / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (default: sys.argv) and run the experiment; the exit status."""
    return cli.run(experiment, DelayArgs, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
