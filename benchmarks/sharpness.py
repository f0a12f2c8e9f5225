"""Benchmark the λ_max estimator against pyhessian on a CIFAR-ResNet-20, side by side.

Prints ratios measured in one run (absolute times on a shared machine mean little):

- time to reach 1e-3 relative error against a tightly converged reference, for our
  Lanczos from a cold start (per product path, and for the first call of a run, which
  also traces the forward-over-reverse product), each divided by pyhessian's time to
  the same accuracy;
- the same for warm starts, as a probe tracking λ_max during training runs them: each
  solve starts from the previous solve's eigenvector. Four stretches of training:
  full-batch gradient descent on the sharpness batch with a solve every step and every
  ``--gap`` steps (``--repeats`` solves each), and minibatch SGD with momentum with
  ``--rounds`` solves ``--gap`` steps apart, right after step 15 and again after
  ``--settle-steps`` more steps. Each stretch reports the median ratio over its solves
  and the ratio of summed times. Both are times to 1e-3 against the reference, which a
  probe cannot observe: it stops on its residual, a product or two later, so each
  stretch also times both solvers stopping by their own rules at 1e-3. Each of our
  solves is timed for λ_max (the Ritz value) and for the refined value
  ``lambda_refined``, from the same products;
- time of one Hessian-vector product divided by one forward+backward, per path, and
  the one-time costs: building the double-backward graph, tracing the split
  forward-over-reverse product, and running its primal part once per solve;
- peak memory of a solve (resident set size growth, each in a fresh process),
  per path divided by pyhessian's.

Both estimators see the same 128-image batch with BatchNorm in eval mode, the only
mode pyhessian supports. The training between solves runs in float64, so that the
problem instance (printed as the reference λ_max and λ2) depends on ``--seed`` and not
on the machine's convolution kernels; the solves run in float32. Usage:

    python benchmarks/sharpness.py [--data-root DIR_WITH_cifar-10-batches-py] [--repeats 3] [--seed 0]
    python benchmarks/sharpness.py --data-root DIR --cold-only --seed 1   # cold starts only, another instance
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import itertools
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from statistics import median

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynamics.data import TensorLoader, load_cifar10_dataset  # noqa: E402
from dynamics.models import CifarResNet  # noqa: E402
from probes.hessian import HessianOperator, lanczos, mixed_start, solve_mode  # noqa: E402
from probes.linearized import cached_split_product  # noqa: E402

ACCURACY = 1e-3
# Cold starts compared with pyhessian: (product path, start vector of ours_trace).
STARTS = {
    "cold_forward_over_reverse": ("forward_over_reverse", "gradient"),
    "cold_double_backward": ("double_backward", "gradient"),
    "cold_gaussian_start": ("forward_over_reverse", None),
}
STARTS_LABELS = {
    "cold_forward_over_reverse": "ours, cold start from the gradient, forward-over-reverse (split traced earlier in the run)",
    "cold_double_backward": "ours, cold start from the gradient, double backward",
    "cold_gaussian_start": "ours, cold start from a Gaussian vector, forward-over-reverse",
}


class Training:
    """Train a float64 copy of ``model`` and mirror its parameters and buffers into ``model`` (float32).

    The benchmark's training is chaotic. In float32, switching the convolution kernels
    (mkldnn off) changed the parameters by 3.6% after the 15 warm-up steps, so runs 1-9
    in RESULTS.md measured a different instance on each machine. In float64 a relative
    perturbation of 1e-12 grew to 1e-3 over those 15 steps, so rounding differences of
    about 1e-16 should leave the instance at step 15 the same to about 1e-7. Training
    with 1 and with 2 threads, whose reductions round differently, gave parameters at
    step 15 that differed by 1.6e-13 (relative L2 norm). A second machine has not been
    compared. The timed solves run on ``model`` in float32. It stays the same module object across training
    steps, so its cached forward-over-reverse trace stays valid.
    NOTE: the hundreds of minibatch steps before the later warm start amplify even
    float64 rounding, so that measurement may still differ between machines.
    """

    def __init__(self, model: nn.Module, loss_fn, make_optimizer, next_batch, master: nn.Module | None = None) -> None:
        self.model = model
        self.master = copy.deepcopy(model).double() if master is None else master
        self.optimizer = make_optimizer(self.master.parameters())
        self.loss_fn, self.next_batch = loss_fn, next_batch
        self.step = 0  # training steps taken, counting those of the Training this one branched from

    def steps(self, count: int) -> None:
        self.step += count
        self.master.train()
        for _ in range(count):
            x, y = self.next_batch()
            self.optimizer.zero_grad()
            self.loss_fn(self.master(x.double()), y).backward()
            self.optimizer.step()
        self.model.load_state_dict(self.master.state_dict())  # copy_ casts to float32

    def branch(self, make_optimizer, next_batch) -> Training:
        """Return a new ``Training`` from the current state (optimizer state aside), on copies of both models."""
        branch = Training(copy.deepcopy(self.model), self.loss_fn, make_optimizer, next_batch, copy.deepcopy(self.master))
        branch.step = self.step
        return branch


def make_problem(data_root: str | None, batch: int = 128, seed: int = 0):
    """Return a ResNet-20 trained for 15 steps, its loss, a fixed batch (real CIFAR
    images when given) and the ``Training`` that goes on from there (SGD with momentum)."""
    torch.manual_seed(seed)
    if data_root:
        dataset = load_cifar10_dataset(data_root)
        loader = TensorLoader(dataset.train_x, dataset.train_y, batch, shuffle=True, augment=True,
                              mean=dataset.mean, std=dataset.std, seed=seed)
        stream = (pair for _ in itertools.count() for pair in loader)  # epoch after epoch
        next_batch = lambda: next(stream)  # noqa: E731
    else:
        next_batch = lambda: (torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))  # noqa: E731
    inputs, targets = next_batch()
    model = CifarResNet(20)
    loss_fn = nn.CrossEntropyLoss()
    training = Training(model, loss_fn, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), next_batch)
    training.steps(15)  # leave the random initialization
    return model, loss_fn, inputs, targets, training


def ours_trace(model, loss_fn, inputs, targets, method, start="gradient", max_iter=80, seed=1, tol=0.0):
    """Run Lanczos and return [(seconds, Ritz value, refined value, residual)] after each product.

    With the default ``tol`` of 0 it runs all ``max_iter`` products.

    ``start`` is a vector (warm start), ``"gradient"`` (the estimator's cold-start
    default) or None (a Gaussian vector). A vector or the gradient is mixed with a
    Gaussian one, as ``top_eigenvalue`` does (:func:`probes.hessian.mixed_start`).
    """
    model.eval()
    trace = []
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
        if isinstance(start, str):
            start = operator.gradient()
        if start is not None:
            start = mixed_start(start, generator)
        lanczos(operator, operator.dim, max_iter=max_iter, tol=tol, start=start, generator=generator,
                callback=lambda j, theta, refined, residual: trace.append(
                    (time.perf_counter() - started, theta, refined, residual)))
        operator.release()
    return trace


def ours_vector(model, loss_fn, inputs, targets, method):
    model.eval()
    with solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
        estimate = lanczos(operator, operator.dim, max_iter=150, tol=1e-9, generator=torch.Generator().manual_seed(7))
        operator.release()
    return estimate


def ritz(trace):
    """[(seconds, Ritz value)]: what λ_max reports after each product."""
    return [(seconds, theta) for seconds, theta, _, _ in trace]


def refined(trace):
    """[(seconds, refined value)]: what lambda_refined reports after each product."""
    return [(seconds, value) for seconds, _, value, _ in trace]


def own_stop(trace, reference):
    """Return (seconds, products, relative error of λ_max) where our own rule at tolerance
    ACCURACY stops on ``trace``: at the first product whose residual is at most
    ACCURACY·|θ|, as a solve with ``tol=ACCURACY`` would. The solve up to that product
    is the same with any smaller ``tol``, so a tight trace contains the stop. A trace that
    never gets there counts whole, as a solve that ran out of products."""
    for index, (seconds, theta, _, residual) in enumerate(trace):
        if residual <= ACCURACY * abs(theta):
            return seconds, index + 1, abs(theta / reference - 1)
    return trace[-1][0], len(trace), abs(trace[-1][1] / reference - 1)


def warm_chain(training: Training, loss_fn, inputs, targets, gap: int, rounds: int) -> dict:
    """Track λ_max every ``gap`` training steps, each solve warm-started from the previous eigenvector.

    Each round trains ``gap`` steps, solves tightly for the reference (whose eigenvector
    starts the next round), runs pyhessian once (seeded by the round) and times our
    forward-over-reverse solve from the previous round's eigenvector, as a probe
    tracking λ_max during training would run it. Returns per round our products,
    pyhessian's, λ_max and the ratio of times to 1e-3; over the rounds the median ratio
    and ``total``, our summed time to 1e-3 divided by pyhessian's over that stretch of
    training. Keys starting with ``refined_`` hold the same for the refined value, and
    keys starting with ``own_`` and ``pyhessian_own_`` the products, largest relative
    error and summed-time ratio with each solver stopping by its own rule at 1e-3.
    """
    model = training.model
    model.eval()
    ours_trace(model, loss_fn, inputs, targets, "forward_over_reverse", max_iter=1)  # trace outside the timing
    previous = ours_vector(model, loss_fn, inputs, targets, "double_backward")
    rows, own_rows = [], []
    for round_index in range(rounds):
        training.steps(gap)
        current = ours_vector(model, loss_fn, inputs, targets, "double_backward")
        # Tolerances far below 1e-3 end both traces once the values no longer move at that scale.
        pyhessian = pyhessian_trace(model, loss_fn, inputs, targets, max_iter=100, seed=round_index, tol=1e-6)
        theirs = time_to_accuracy(pyhessian, current.lambda_max)
        if math.isinf(theirs[0]):  # never within 1e-3: count all its time, so our ratio is an upper bound
            theirs = (pyhessian[-1][0], f">{len(pyhessian)}")
        trace = ours_trace(model, loss_fn, inputs, targets, "forward_over_reverse", start=previous.vector,
                           max_iter=40, tol=1e-7)
        rows.append((current.lambda_max, theirs, time_to_accuracy(ritz(trace), current.lambda_max),
                     time_to_accuracy(refined(trace), current.lambda_max)))
        # What a probe pays: our solve stopping on its residual at tol 1e-3, against
        # pyhessian stopping by its own rule at the same tolerance.
        own_rows.append((own_stop(trace, current.lambda_max), pyhessian_own_stop(pyhessian, current.lambda_max)))
        previous = current
    result = {"lambdas": [row[0] for row in rows], "pyhessian_products": [row[1][1] for row in rows],
              "own_products": [ours[1] for ours, _ in own_rows], "own_error": max(ours[2] for ours, _ in own_rows),
              "pyhessian_own_products": [theirs[1] for _, theirs in own_rows],
              "pyhessian_own_error": max(theirs[2] for _, theirs in own_rows),
              "own_total": sum(ours[0] for ours, _ in own_rows) / sum(theirs[0] for _, theirs in own_rows)}
    pyhessian_total = sum(row[1][0] for row in rows)
    for prefix, column in (("", 2), ("refined_", 3)):
        ratios = [row[column][0] / row[1][0] for row in rows]
        result.update({f"{prefix}ratios": ratios, f"{prefix}ratio": median(ratios),
                       f"{prefix}products": [row[column][1] for row in rows],
                       f"{prefix}total": sum(row[column][0] for row in rows) / pyhessian_total})
    return result


def compare_starts(training: Training, loss_fn, inputs, targets, gaps=(1, 1, 1, 5, 5, 5, 20)) -> None:
    """Print the products to 1e-3 from the previous eigenvector and from the loss gradient.

    Trains minibatch SGD for each gap in ``gaps`` and solves after each, so every row
    compares both starts on the same Hessian. These counts chose the |cos| threshold of
    ``SharpnessProbe(start="auto")``.
    """
    model = training.model
    previous = ours_vector(model, loss_fn, inputs, targets, "double_backward")
    print("minibatch SGD; products to 1e-3 for λ_max (Ritz value) and the refined value:")
    for gap in gaps:
        training.steps(gap)
        current = ours_vector(model, loss_fn, inputs, targets, "double_backward")
        cosine = abs(torch.dot(previous.vector, current.vector).item())
        counts = {}
        for name, start in (("previous eigenvector", previous.vector), ("gradient", "gradient")):
            trace = ours_trace(model, loss_fn, inputs, targets, "double_backward", start=start, max_iter=12)
            counts[name] = (time_to_accuracy(ritz(trace), current.lambda_max)[1],
                            time_to_accuracy(refined(trace), current.lambda_max)[1])
        print(f"  {gap:>2} steps after the previous solve: λ_max {current.lambda_max:.1f}, λ2 {current.lambda_2:.1f}, "
              f"|cos| between eigenvectors {cosine:.3f}; "
              + ", ".join(f"from the {name} {ritz_count} and {refined_count}"
                          for name, (ritz_count, refined_count) in counts.items()))
        previous = current


def first_call_seconds(model, loss_fn, inputs, targets) -> float:
    """Return the seconds the first forward-over-reverse solve of a run spends tracing its split product.

    Measured as the first bind (trace and primal part) minus a later bind (primal part only).
    """
    model.eval()
    with solve_mode(model):
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse").gradient()
            timings.append(time.perf_counter() - started)
    return timings[0] - timings[1]


def pyhessian_trace(model, loss_fn, inputs, targets, max_iter=200, seed=1, tol=1e-7) -> list:
    """Run pyhessian's power iteration, which stops when two successive values differ
    by less than ``tol`` relatively, and return [(seconds, estimate)] after each product.
    """
    import pyhessian

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    trace = []
    started = time.perf_counter()

    def recording(grads, params, v):
        product = original(grads, params, v)
        theta = sum((h * w).sum() for h, w in zip(product, v)).item()  # v is unit-norm here
        trace.append((time.perf_counter() - started, theta))
        return product

    module.hessian_vector_product = recording
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = pyhessian.hessian(model, loss_fn, data=(inputs, targets), cuda=False)
            engine.eigenvalues(maxIter=max_iter, tol=tol)
    finally:
        module.hessian_vector_product = original
        for p in model.parameters():
            p.grad = None
    return trace


def pyhessian_own_stop(trace, reference):
    """Return (seconds, products, relative error) where pyhessian's own rule at tolerance
    ACCURACY stops on ``trace``: when two successive values differ by less than
    ACCURACY relatively. It then returns the earlier of the two values."""
    for index in range(1, len(trace)):
        before, now = trace[index - 1][1], trace[index][1]
        if abs(before - now) / (abs(before) + 1e-6) < ACCURACY:
            return trace[index][0], index + 1, abs(before / reference - 1)
    return trace[-1][0], len(trace), abs(trace[-1][1] / reference - 1)


def time_to_accuracy(trace, reference):
    """Seconds until the estimate stays within ACCURACY of the reference (inf if never)."""
    for index, (seconds, theta) in enumerate(trace):
        if all(abs(t - reference) <= ACCURACY * abs(reference) for _, t in trace[index:]):
            return seconds, index + 1
    return math.inf, len(trace)


def product_ratios(model, loss_fn, inputs, targets, repeats):
    """Return {path: HVP seconds / forward+backward seconds}, medians over ``repeats`` timings."""
    model.eval()

    def median_time(fn, count=5):
        fn()  # warm-up
        times = []
        for _ in range(count * repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward():
        torch.autograd.grad(loss_fn(model(inputs), targets), params)

    base = median_time(forward_backward)
    ratios = {"forward_backward": base}
    vector = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    tangents = [torch.randn_like(p) for p in params]

    def plain_forward_over_reverse():
        from torch.func import functional_call, grad, jvp

        def loss(values):
            return loss_fn(functional_call(model, dict(zip(names, values)), (inputs,)), targets)

        jvp(grad(loss), (tuple(p.detach() for p in params),), (tuple(tangents),))

    with solve_mode(model):
        ratios["forward_over_reverse_plain"] = median_time(plain_forward_over_reverse, count=3) / base
        ratios["split_bind"] = median_time(
            lambda: HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse").gradient()) / base
        ratios["split_bind_lean"] = median_time(
            lambda: cached_split_product(model, names, loss_fn, 1.0, params, inputs, targets, with_gradient=False)) / base
        for method in ("double_backward", "forward_over_reverse"):
            operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
            ratios[method] = median_time(lambda: operator(vector)) / base
            operator.release()
            if method == "double_backward":
                # The first product also builds the gradient graph; time that one apart.
                fresh = HessianOperator(model, loss_fn, inputs, targets, method=method)
                started = time.perf_counter()
                fresh(vector)
                ratios["double_backward_first"] = (time.perf_counter() - started) / base
                fresh.release()
    return ratios


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


MEMORY_CASES = ("double_backward", "forward_over_reverse", "pyhessian")


def memory_child(case: str, data_root: str | None, seed: int) -> None:
    """Print peak RSS growth (KiB) during one 30-product solve, run in a fresh process (Linux).

    An untimed solve first traces the forward-over-reverse split, as happens once per
    run. Freed memory is then handed back to the system, so the growth is the solve's.
    """
    model, loss_fn, inputs, targets, _ = make_problem(data_root, seed=seed)
    model.eval()
    if case == "forward_over_reverse":
        ours_trace(model, loss_fn, inputs, targets, case, max_iter=1)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    if case == "pyhessian":
        pyhessian_trace(model, loss_fn, inputs, targets, max_iter=30)
    else:
        ours_trace(model, loss_fn, inputs, targets, case, max_iter=30)
    print(_status_kib("VmHWM") - before)


def memory_growth(data_root: str | None, seed: int) -> dict[str, int]:
    growth = {}
    for case in MEMORY_CASES:
        command = [sys.executable, __file__, "--memory-child", case, "--seed", str(seed)]
        command += ["--data-root", data_root] if data_root else []
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        growth[case] = int(output)
    return growth


def positive_steps(text: str) -> tuple[int, ...]:
    """Parse "1,5,20" into (1, 5, 20) for argparse, rejecting anything but integers >= 1."""
    try:
        gaps = tuple(int(part) for part in text.split(","))
    except ValueError:
        gaps = ()
    if not gaps or min(gaps) < 1:
        raise argparse.ArgumentTypeError(f"invalid gaps {text!r}: expected integers >= 1 separated by commas, like 1,5,20")
    return gaps


def counting_number(minimum: int):
    """Return an argparse type that parses an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= {minimum}")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: random images)")
    parser.add_argument("--repeats", type=counting_number(1), default=3, help="timing repeats (medians are reported)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialization and the data order, which fix the problem instance")
    parser.add_argument("--gap", type=counting_number(1), default=5, help="SGD steps between a solve and its warm-started successor")
    parser.add_argument("--settle-steps", type=counting_number(0), default=300,
                        help="SGD steps between the early and the later warm-start measurements")
    parser.add_argument("--rounds", type=counting_number(1), default=6,
                        help="warm-started solves in each minibatch SGD stretch (each timed once)")
    parser.add_argument("--gd-lr", type=float, default=0.01, help="step size of the full-batch gradient descent")
    parser.add_argument("--gd-steps", type=counting_number(0), default=20,
                        help="full-batch gradient descent steps before its warm-start measurements")
    parser.add_argument("--cold-only", action="store_true",
                        help="stop after the cold starts (for a quick look at other instances with --seed)")
    parser.add_argument("--compare-starts", action="store_true",
                        help="only compare warm starts with gradient starts under minibatch SGD, counting products")
    parser.add_argument("--start-gaps", type=positive_steps, default=(1, 1, 1, 5, 5, 5, 20),
                        help="with --compare-starts: SGD steps before each solve, comma-separated "
                             "(default 1,1,1,5,5,5,20)")
    parser.add_argument("--memory-child", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.start_gaps != parser.get_default("start_gaps") and not args.compare_starts:
        parser.error("--start-gaps applies only with --compare-starts")
    if args.memory_child:
        memory_child(args.memory_child, args.data_root, args.seed)
        return
    torch.set_num_threads(torch.get_num_threads())

    model, loss_fn, inputs, targets, training = make_problem(args.data_root, seed=args.seed)
    print(f"CIFAR-ResNet-20, batch {len(targets)}, {'real CIFAR-10 images' if args.data_root else 'random images'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.compare_starts:
        compare_starts(training, loss_fn, inputs, targets, args.start_gaps)
        return

    reference = ours_vector(model, loss_fn, inputs, targets, "double_backward")
    # λ_max and λ2 identify the instance. Runs 1-9 in RESULTS.md trained in float32 and
    # measured instances that differed between machines (see Training).
    print(f"reference λ_max {reference.lambda_max:.6g}, λ2 {reference.lambda_2:.6g} (residual "
          f"{reference.residual:.2e}, {reference.hvp_count} products, converged {reference.converged})")

    trace_seconds = first_call_seconds(model, loss_fn, inputs, targets)
    pyhessian_runs, runs, refined_runs = [], {name: [] for name in STARTS}, []
    own_runs, pyhessian_own_runs = [], []  # each solver stopping by its own rule at tolerance ACCURACY
    for repeat in range(args.repeats):
        for name, (method, start) in STARTS.items():
            trace = ours_trace(model, loss_fn, inputs, targets, method, start=start, seed=repeat)
            runs[name].append(time_to_accuracy(ritz(trace), reference.lambda_max))
            if name == "cold_forward_over_reverse":
                refined_runs.append(time_to_accuracy(refined(trace), reference.lambda_max))
                own_runs.append(own_stop(trace, reference.lambda_max))
        pyhessian = pyhessian_trace(model, loss_fn, inputs, targets, seed=repeat)
        pyhessian_runs.append(time_to_accuracy(pyhessian, reference.lambda_max))
        pyhessian_own_runs.append(pyhessian_own_stop(pyhessian, reference.lambda_max))
    pyhessian_time = median(s for s, _ in pyhessian_runs)

    print(f"\ntime to {ACCURACY:g} relative error (medians of {args.repeats}), divided by pyhessian's "
          f"({[p for _, p in pyhessian_runs]} products of its power iteration):")
    summary = {}
    for name, label in STARTS_LABELS.items():
        seconds = median(s for s, _ in runs[name])
        summary[name] = seconds / pyhessian_time
        target = "  (target <= 0.5)" if name == "cold_forward_over_reverse" else ""
        print(f"  {label}: {[p for _, p in runs[name]]} products, {summary[name]:.3f}{target}")
    summary["cold_forward_over_reverse_refined"] = median(s for s, _ in refined_runs) / pyhessian_time
    print(f"  the same, refined value (lambda_refined): {[p for _, p in refined_runs]} products, "
          f"{summary['cold_forward_over_reverse_refined']:.3f}")
    first = (median(s for s, _ in runs["cold_forward_over_reverse"]) + trace_seconds) / pyhessian_time
    print(f"  the same, at the first call of a run (adds the one-time trace): {first:.3f}")
    summary["cold_own_stop_rule"] = (median(row[0] for row in own_runs)
                                     / median(row[0] for row in pyhessian_own_runs))
    print(f"  each stopping by its own rule at tolerance {ACCURACY:g} instead (ours: residual; pyhessian: relative "
          f"change between iterations): ours {[row[1] for row in own_runs]} products, largest error "
          f"{max(row[2] for row in own_runs):.1e}; pyhessian {[row[1] for row in pyhessian_own_runs]} products, "
          f"largest error {max(row[2] for row in pyhessian_own_runs):.1e}; {summary['cold_own_stop_rule']:.3f}")
    if args.cold_only:
        print(json.dumps({f"{name}_over_pyhessian": value for name, value in summary.items()}))
        return

    # Warm starts along training. Full-batch gradient descent on the sharpness batch is
    # the training of `eos study sharpness` (Cohen et al., 2021), here on a copy of the
    # model. Minibatch SGD goes on from step 15, where λ_max moves fast, and again later.
    chains = {}

    def track(run: Training, description: str, key: str, gap: int, rounds: int) -> None:
        first, last = run.step + gap, run.step + gap * rounds
        label = f"{description}, {rounds} solves {gap} step{'s' if gap > 1 else ''} apart at steps {first}-{last}"
        chains[label] = (key, warm_chain(run, loss_fn, inputs, targets, gap, rounds))

    full_batch = training.branch(lambda params: torch.optim.SGD(params, lr=args.gd_lr), lambda: (inputs, targets))
    full_batch.steps(args.gd_steps)
    description = f"full-batch gradient descent at lr {args.gd_lr:g} (2/lr = {2 / args.gd_lr:g})"
    track(full_batch, description, "gradient_descent_every_1", 1, args.repeats)
    track(full_batch, description, f"gradient_descent_every_{args.gap}", args.gap, args.repeats)
    del full_batch
    track(training, "minibatch SGD with momentum", "minibatch_early", args.gap, args.rounds)
    training.steps(args.settle_steps)
    track(training, "minibatch SGD with momentum", "minibatch_later", args.gap, args.rounds)

    print(f"\nwarm starts from the previous solve's eigenvector, time to {ACCURACY:g} relative error "
          "divided by pyhessian's (cold); forward-over-reverse; target <= 0.25. A pyhessian count >N means "
          f"it was not within {ACCURACY:g} after N products, and all its time is counted:")
    for label, (key, chain) in chains.items():
        print(f"  {label}: λ_max {[round(value, 1) for value in chain['lambdas']]}, "
              f"pyhessian products {chain['pyhessian_products']}")
        for name, prefix in (("λ_max (Ritz value)", ""), ("refined value", "refined_")):
            summary[f"warm_{key}_{prefix}median"] = chain[f"{prefix}ratio"]
            summary[f"warm_{key}_{prefix}total"] = chain[f"{prefix}total"]
            print(f"    {name}: products {chain[f'{prefix}products']}, ratios "
                  f"{[round(value, 3) for value in chain[f'{prefix}ratios']]}, median {chain[f'{prefix}ratio']:.3f}, "
                  f"summed times {chain[f'{prefix}total']:.3f}")
        summary[f"warm_{key}_own_stop_rule_total"] = chain["own_total"]
        print(f"    each stopping by its own rule at {ACCURACY:g} (what a probe pays): ours {chain['own_products']} "
              f"products, largest error {chain['own_error']:.1e}; pyhessian {chain['pyhessian_own_products']} "
              f"products, largest error {chain['pyhessian_own_error']:.1e}; summed times {chain['own_total']:.3f}")

    ratios = product_ratios(model, loss_fn, inputs, targets, args.repeats)
    print("\nHessian-vector product time / forward+backward time:")
    print(f"  one-time trace of the forward-over-reverse split: {trace_seconds / ratios['forward_backward']:.1f}")
    print(f"  double backward, graph reused: {ratios['double_backward']:.2f}")
    print(f"  double backward, first product (builds the graph): {ratios['double_backward_first']:.2f}")
    print(f"  forward-over-reverse, primal part done once per solve: {ratios['forward_over_reverse']:.2f}  "
          "(target <= 2.6)")
    print(f"  forward-over-reverse, primal part computed at every product (torch.func.jvp): "
          f"{ratios['forward_over_reverse_plain']:.2f}")
    print(f"  primal part of the split (once per solve; gives the gradient too): {ratios['split_bind']:.2f}")
    print(f"  primal part without the gradient (once per warm-started solve): {ratios['split_bind_lean']:.2f}")

    growth = memory_growth(args.data_root, args.seed)
    memory = {method: growth[method] / max(growth["pyhessian"], 1) for method in ("double_backward", "forward_over_reverse")}
    print(f"\npeak memory growth during a 30-product solve, divided by pyhessian's ({growth['pyhessian']} KiB):")
    for method, ratio in memory.items():
        print(f"  {method.replace('_', '-')}: {ratio:.2f} ({growth[method]} KiB)")
    print(json.dumps({
        **{f"{name}_over_pyhessian": value for name, value in summary.items()},
        "first_call_forward_over_reverse_over_pyhessian": first,
        "double_backward_over_fwd_bwd": ratios["double_backward"],
        "forward_over_reverse_over_fwd_bwd": ratios["forward_over_reverse"],
        **{f"memory_{method}_over_pyhessian": ratio for method, ratio in memory.items()},
    }))


if __name__ == "__main__":
    main()
